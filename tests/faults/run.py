"""Runs the fault suite at full size and writes its table to docs/faults.md.

    .venv/bin/python -m tests.faults.run            # FAULTS_JOBS=1000 unless set

Uses the PostgreSQL and Redis that DATABASE_URL and REDIS_URL name (as .ci/run sets them).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "docs" / "faults.md"


def main() -> int:
    rows = ROOT / ".faults-rows.md"
    rows.unlink(missing_ok=True)
    env = {**os.environ, "FAULTS_REPORT": str(rows)}
    env.setdefault("FAULTS_JOBS", "1000")
    code = subprocess.call(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults"], env=env
    )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    header = (
        "# Fault suite, full size\n\n"
        f"Written by `python -m tests.faults.run` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"commit {commit.stdout.strip() or '?'}, {platform.node()} ({os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}), FAULTS_JOBS={env['FAULTS_JOBS']}, "
        f"pytest exit code {code}.\n\n"
        "| scenario | accepted | completed | lost or stuck | duplicate executions | duplicate effects "
        "| missing effects | recovery s | notes |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    TARGET.write_text(header + (rows.read_text() if rows.exists() else ""))
    rows.unlink(missing_ok=True)
    print(TARGET.read_text())
    return code


if __name__ == "__main__":
    raise SystemExit(main())
