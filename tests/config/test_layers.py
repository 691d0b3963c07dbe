"""Imports run one way: faces -> task families -> task policy -> the job record -> config.

Read from the source (every import, including those inside functions), not from what
happens to be loaded: a lazy import that reaches up is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("config", "jobs", "tasks", "scheduling", "monitoring", "localdev", "delivery", "bench")

# The job's record: its models, how its writes commit, claim and outcome, publishing, the outbox, the
# reconciler, the database gate. Below every task family; the REST API (jobs.api, services, ...) is above.
RECORD = (
    "jobs.models",
    "jobs.protocol",
    "jobs.commits",
    "jobs.sql",
    "jobs.tracking",
    "jobs.tree",
    "jobs.publish",
    "jobs.outbox",
    "jobs.reconcile",
    "jobs.gate",
    "jobs.worker",
)
RECORD_MAY_IMPORT = ("config", *RECORD)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" not in path.parts:
                found[module_name(path)] = path
    return found


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, resolved to modules (not names inside them)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules.keys()
            # `from jobs import tracking` imports jobs.tracking; `from jobs.models import Job`, jobs.models.
            names.update(submodules or {node.module})
    return {name for name in names if name in modules}


def test_the_record_imports_nothing_above_it() -> None:
    modules = project_modules()
    wrong = {
        module: sorted(
            name for name in imports_of(modules[module], modules) if not name.startswith(RECORD_MAY_IMPORT)
        )
        for module in RECORD
    }
    assert {module: names for module, names in wrong.items() if names} == {}


def test_no_two_modules_import_each_other() -> None:
    modules = project_modules()
    graph = {module: imports_of(path, modules) - {module} for module, path in modules.items()}
    pairs = sorted(
        (a, b)
        for a, targets in graph.items()
        for b in targets
        if a < b and a in graph.get(b, set()) and not (a.startswith(b + ".") or b.startswith(a + "."))
    )
    assert pairs == []
