"""Runs the fault suite at full size, on Redis and on RabbitMQ, and writes its table to docs/faults.md.

    .venv/bin/python -m tests.faults.run            # FAULTS_JOBS=1000 unless set

Redis: the one REDIS_URL names (as .ci/run sets it), else an embedded one. RabbitMQ: RABBITMQ_URL
(give it a vhost of its own), when it answers; metrics and the send rate then live in REDIS_URL's
Redis, as in a RabbitMQ deployment. FAULTS_BROKERS=redis (or rabbitmq) runs one pass only.
Set RABBITMQ_MAY_RESTART=1 where the RabbitMQ node is the run's own: its restart scenario runs then.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from tests.rabbitmq import RABBITMQ_URL, rabbitmq_answers

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "docs" / "faults.md"


def broker_environments(base: dict[str, str]) -> dict[str, dict[str, str]]:
    """The environment of each pass, by broker name; RabbitMQ only where it answers."""
    wanted = base.get("FAULTS_BROKERS", "redis,rabbitmq").split(",")
    passes: dict[str, dict[str, str]] = {}
    if "redis" in wanted:
        redis_env = dict(base)
        if redis_env.get("CELERY_BROKER_URL", "").startswith(("amqp", "pyamqp")):
            del redis_env["CELERY_BROKER_URL"]  # REDIS_URL (or an embedded one) then
        passes["Redis"] = redis_env
    if "rabbitmq" in wanted:
        if rabbitmq_answers():
            amqp_env = {**base, "CELERY_BROKER_URL": RABBITMQ_URL}
            if base.get("REDIS_URL"):
                amqp_env.setdefault("METRICS_REDIS_URL", base["REDIS_URL"])
                amqp_env.setdefault("RATE_LIMIT_STORAGE_URL", base["REDIS_URL"])
            passes["RabbitMQ"] = amqp_env
        else:
            print(f"no RabbitMQ at {RABBITMQ_URL} (RABBITMQ_URL): the RabbitMQ pass is left out")
    return passes


def main() -> int:
    rows = ROOT / ".faults-rows.md"
    rows.unlink(missing_ok=True)
    base = {**os.environ, "FAULTS_REPORT": str(rows)}
    base.setdefault("FAULTS_JOBS", "1000")
    codes: dict[str, int] = {}
    for broker, env in broker_environments(base).items():
        codes[broker] = subprocess.call(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults"], env=env
        )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    exits = ", ".join(f"{broker} {code}" for broker, code in codes.items())
    header = (
        "# Fault suite, full size\n\n"
        f"Written by `python -m tests.faults.run` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"commit {commit.stdout.strip() or '?'}, {platform.node()} ({os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}), "
        f"FAULTS_JOBS={base['FAULTS_JOBS']}, pytest exit codes: {exits}.\n\n"
        "| broker | scenario | accepted | completed | lost or stuck | duplicate executions "
        "| duplicate effects | missing effects | recovery s | notes |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    TARGET.write_text(header + (rows.read_text() if rows.exists() else ""))
    rows.unlink(missing_ok=True)
    print(TARGET.read_text())
    return max(codes.values(), default=1)


if __name__ == "__main__":
    raise SystemExit(main())
