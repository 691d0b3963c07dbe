"""A copy of the project's source in a temporary directory: "a fresh clone", for tests that run
`bin/run`'s stack or read files it writes into the project (.env, .run/, db.sqlite3), so that
they never touch the checkout the tests run from (a developer's own stack may be using it)."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What a clone does not have: git's, the virtualenv, state and output of earlier runs.
NOT_IN_A_CLONE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".run",
    ".env",
    "__pycache__",
    "*.pyc",
    "db.sqlite3*",
    "media",
    "staticfiles",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "test-artifacts",
    "results",
)


def copy_project(destination: Path) -> Path:
    shutil.copytree(ROOT, destination, ignore=NOT_IN_A_CLONE)
    return destination
