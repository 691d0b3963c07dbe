"""One system, one repetition: `python -m bench.peers.driver '<config JSON>'`, started by `python -m bench`.

Runs bench.peers.harness.measure on the system the config names, in this process (the client),
with the interpreter that has the system installed: the project's for this project and stock
Celery, the peers' virtualenv for Dramatiq and Huey. Prints progress lines, then one line
`RESULT <JSON>`. Whatever happens (an error, SIGINT, SIGTERM), the workers it started are
stopped and the system is emptied before it exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "RESULT "


def make(config: dict[str, Any]) -> Any:
    kind = config["kind"]
    from bench.peers.harness import BROKER_VARIABLE

    # A peer's app module reads its broker from here when imported (its workers get it the same way).
    os.environ[BROKER_VARIABLE] = config["broker_url"]
    if kind == "project":
        from bench.peers.project import ProjectSystem

        return ProjectSystem(config)
    if kind == "celery":
        from bench.peers.celery_stock import CelerySystem

        return CelerySystem(config)
    if kind == "dramatiq":
        from bench.peers.dramatiq_app import DramatiqSystem

        return DramatiqSystem(config)
    if kind == "huey":
        from bench.peers.huey_app import HueySystem

        return HueySystem(config)
    raise SystemExit(f"unknown system kind {kind!r}")


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    from bench.peers.harness import Plan, Workers, measure

    config = json.loads(argv[0])
    signal.signal(signal.SIGTERM, _interrupted)
    plan = Plan(**config["plan"])
    workers = Workers(Path(plan.run_dir))
    system = make(config)
    if config.get("prepare_only"):
        print(RESULT_PREFIX + "{}", flush=True)
        return 0

    def say(text: str) -> None:
        print(f"    {system.name}: {text}", flush=True)

    try:
        figures = measure(system, plan, workers, ROOT, say)
        figures["settings"] = system.describe()
    finally:
        # A second Ctrl-C (or the parent's SIGTERM after the terminal's SIGINT) must not cut this short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        workers.stop_all()
        with contextlib.suppress(Exception):
            system.reset()
    print(RESULT_PREFIX + json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
