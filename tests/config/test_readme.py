"""The README is the contract users read: every setting and every task name must be in it."""

from __future__ import annotations

import re
from pathlib import Path

from config.celery_app import app

ROOT = Path(__file__).resolve().parent.parent.parent
README = (ROOT / "README.md").read_text()
FAMILIES = ("default.", "email.", "images.", "data_sync.", "analytics.")


def test_every_environment_variable_the_settings_read_is_documented() -> None:
    source = (ROOT / "config" / "settings" / "base.py").read_text()
    variables = set(re.findall(r"env\.\w+\(\s*\"([A-Z][A-Z0-9_]+)\"", source))

    assert len(variables) > 30  # the pattern still finds them
    assert sorted(name for name in variables if f"`{name}`" not in README) == []


def test_every_task_is_documented_by_name() -> None:
    names = {name for name in app.tasks if name.startswith(FAMILIES) and "probe" not in name}

    assert {"email.send", "images.process", "data_sync.sync", "analytics.aggregate_daily"} <= names
    assert sorted(name for name in names if f"`{name}`" not in README) == []
