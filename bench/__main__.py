"""This project beside stock Celery, Dramatiq and Huey, and on RabbitMQ: one run, one table.

    python -m bench [--systems project,celery,...] [--repetitions 3] [--jobs 3000] [--quick]
        [--database-url postgres://postgres@127.0.0.1:5432/bench] [--redis-url redis://127.0.0.1:6379]
        [--redis-dbs 8,9,10,11] [--rabbitmq-url amqp://guest:guest@127.0.0.1:5672/bench]

Systems (all by default, in this order; each repetition starts one further along, so a drift of
the machine favours none):

- `project`: this project's worker exactly as the Procfile runs it (production settings,
  `default.ping`: a job row, its result as configured, task events and metrics on), on Redis;
- `project_monitoring_off`: the same with task metrics off (METRICS_ENABLED=false);
- `project_flower`: the same while Flower watches: task events on (Flower's enable_events
  broadcast; CELERY_WORKER_SEND_TASK_EVENTS=true here). By default they are off;
- `celery`: stock Celery with its defaults (bench/peers/celery_stock.py), a no-op task;
- `dramatiq`, `huey`: their Redis brokers and default workers (bench/peers/), a no-op task, from
  the virtualenv .venv-bench that this creates on first use (requirements.txt and
  bench/requirements.txt; reinstalled when either changes);
- `project_rabbitmq`: the project on RabbitMQ (quorum queues as it declares them, a fresh vhost,
  metrics and the shared rate limits in Redis).

Every system gets a Redis database of its own (--redis-dbs: the project's three share the
first, one after the other) and is emptied before and after each of its runs. For each, in a
process of its own (bench/peers/harness.py says how): enqueue rate from one client, one at a
time and by the system's batch path; end-to-end jobs/s draining a backlog; queue wait (send to
start) p50/p95/p99 at a paced load of half that drain rate; the worker's memory; the drain rate
with 1, 2 and 4 worker processes. Prints a table of medians [min-max] and writes
docs/results/bench.json (the date, machine, commit, settings and every run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers import report  # noqa: E402
from bench.peers.driver import RESULT_PREFIX  # noqa: E402
from bench.peers.harness import kill_group, tail  # noqa: E402

STARTED = time.monotonic()

# name -> (label, kind, broker, monitoring, index into --redis-dbs, scaling measured)
SYSTEMS: dict[str, tuple[str, str, str, bool, int, bool]] = {
    "project": ("this project (Procfile worker, default.ping)", "project", "redis", True, 0, True),
    "project_monitoring_off": ("this project, monitoring off", "project", "redis", False, 0, False),
    "project_flower": ("this project, Flower watching (task events on)", "project", "redis", True, 0, False),
    "celery": ("stock Celery (defaults, no-op)", "celery", "redis", True, 1, True),
    "dramatiq": ("Dramatiq (no-op)", "dramatiq", "redis", True, 2, True),
    "huey": ("Huey (no-op)", "huey", "redis", True, 3, True),
    "project_rabbitmq": ("this project on RabbitMQ (quorum queues)", "project", "rabbitmq", True, 0, False),
}
PEER_VENV_KINDS = ("dramatiq", "huey")
# What no system inherits from this shell: a peer's Celery starts its Django fixup when
# DJANGO_SETTINGS_MODULE is set and reads CELERY_BROKER_URL and friends; the project's settings
# are the bench's own (bench/peers/project.py), production's defaults otherwise.
NOT_INHERITED = ("DJANGO_", "CELERY_", "DATABASE_URL", "METRICS_", "RATE_LIMIT_")

QUICK = {"jobs": 300, "repetitions": 1, "enqueue_seconds": 1.0, "drain_seconds": 3.0, "paced_seconds": 2.0}


def redis_url(base: str, db: int) -> str:
    return urlunsplit(urlsplit(base)._replace(path=f"/{db}"))


def clean_environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(NOT_INHERITED)}
    return {**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def fresh_vhost(url: str) -> None:
    """The bench's own vhost, emptied: queues an earlier run (or version) declared go with it."""
    vhost = urlsplit(url).path.lstrip("/")
    if not vhost or not shutil.which("rabbitmqctl"):
        return
    for command in (
        ["delete_vhost", vhost],
        ["add_vhost", vhost],
        ["set_permissions", "-p", vhost, urlsplit(url).username or "guest", ".*", ".*", ".*"],
    ):
        subprocess.run(["rabbitmqctl", "-q", *command], capture_output=True, check=False, timeout=60)


def rabbitmq_version() -> str:
    try:
        done = subprocess.run(
            ["rabbitmqctl", "-q", "version"], capture_output=True, text=True, check=False, timeout=30
        )
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


class Runner:
    def __init__(self, args: argparse.Namespace, run_dir: Path) -> None:
        self.args = args
        self.run_dir = run_dir
        self.peer_python: str | None = None
        self.scaling_on = True  # off for a run the time budget has no room for

    def config(self, name: str, repetition: int) -> tuple[str, dict[str, Any]]:
        _label, kind, broker, monitoring, db_index, scaling = SYSTEMS[name]
        args = self.args
        run_dir = self.run_dir / f"{repetition}-{name}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "records").mkdir(exist_ok=True)
        redis = redis_url(args.redis_url, args.redis_dbs[db_index])
        config: dict[str, Any] = {
            "kind": kind,
            "label": name,
            "broker_url": args.rabbitmq_url if broker == "rabbitmq" else redis,
            "database_url": args.database_url,
            "monitoring": monitoring,
            "events": name == "project_flower",
            "all_paths": name == "project",
            "processes": args.processes,
            "record_dir": str(run_dir / "records"),
            "env": clean_environment(),
            "plan": {
                "jobs": args.jobs,
                "enqueue_seconds": args.enqueue_seconds,
                "drain_seconds": args.drain_seconds,
                "paced_seconds": args.paced_seconds,
                "scaling_seconds": args.scaling_seconds,
                "processes": args.processes,
                "scaling": args.scaling if scaling and self.scaling_on else [],
                "run_dir": str(run_dir),
            },
        }
        if broker == "rabbitmq":
            config["metrics_redis_url"] = redis
        python = sys.executable
        if kind in PEER_VENV_KINDS:
            if self.peer_python is None:
                from bench.peers import venv

                self.peer_python = str(venv.ensure())
            python = self.peer_python
        return python, config

    def run(self, name: str, repetition: int, prepare: bool = False) -> dict[str, Any]:
        python, config = self.config(name, repetition)
        if prepare:
            config.update(prepare_only=True, migrate=True)
        # The project's settings come from the bench (bench/peers/project.py), not from this shell:
        # a METRICS_REDIS_URL or CELERY_* exported for something else would change what is measured.
        env = config["env"]
        if config["kind"] == "project" and os.environ.get("DJANGO_SECRET_KEY"):
            env = {**env, "DJANGO_SECRET_KEY": os.environ["DJANGO_SECRET_KEY"]}
        run_dir = Path(config["plan"]["run_dir"])
        stderr_path = run_dir / "driver.stderr"
        result: dict[str, Any] | None = None
        with stderr_path.open("w") as stderr:
            driver = subprocess.Popen(
                [python, "-m", "bench.peers.driver", json.dumps(config)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
            try:
                assert driver.stdout is not None
                for line in driver.stdout:
                    if line.startswith(RESULT_PREFIX):
                        result = json.loads(line[len(RESULT_PREFIX) :])
                    else:
                        print(line.rstrip(), flush=True)
                driver.wait()
            except BaseException:
                # Ctrl-C reaches the driver too (same process group); a SIGTERM to this process does not:
                # tell it, then wait while it stops its workers and empties its broker.
                with contextlib.suppress(ProcessLookupError):
                    driver.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    driver.wait(timeout=60)
                driver.kill()
                raise
            finally:
                clean_up_workers(run_dir)
        if driver.returncode or result is None:
            error = tail(stderr_path, 40) or f"exit status {driver.returncode}"
            print(f"    {name}: failed:\n" + "\n".join("      " + line for line in error.splitlines()[-15:]))
            return {"error": error}
        return result


def clean_up_workers(run_dir: Path) -> None:
    """Whatever a driver's workers left behind (their process groups), whatever happened to it."""
    pids = run_dir / "workers.pids"
    if pids.exists():
        for line in pids.read_text().split():
            kill_group(int(line))


def estimate(runs: list[dict[str, Any]], scaling: bool) -> float:
    """Seconds the next run of a system takes: as long as its last one, with or without its scaling drains."""
    done = [run for run in runs if "seconds" in run]
    if not done:
        return 0.0
    last = done[-1]
    without = last["seconds"] - last.get("phase_seconds", {}).get("scaling", 0.0)
    if scaling and "scaling_jobs_per_s" not in last:
        with_scaling = [run for run in done if "scaling_jobs_per_s" in run]
        return with_scaling[-1]["seconds"] if with_scaling else without
    return last["seconds"] if scaling else without


def scaling_fits(
    runs: dict[str, list[dict[str, Any]]], remaining: list[tuple[int, str]], budget: float
) -> bool:
    """Whether the next run can have its scaling drains and the rest (without theirs) end by `budget`."""
    if not budget:
        return True
    (_, name), rest = remaining[0], remaining[1:]
    needed = estimate(runs[name], scaling=True) + sum(
        estimate(runs[other], scaling=False) for _, other in rest
    )
    return time.monotonic() - STARTED + needed <= budget


def assemble(runs: dict[str, list[dict[str, Any]]], elapsed: float) -> dict[str, Any]:
    """What docs/results/bench.json holds under "figures": per system its runs, medians and ranges."""
    systems = {name: report.summary(items) for name, items in runs.items()}
    return {
        "systems": systems,
        "ratios": report.ratios(systems),
        "labels": {name: SYSTEMS[name][0] for name in runs},
        "order": list(runs),
        "elapsed_s": elapsed,
    }


def results_params(args: argparse.Namespace) -> dict[str, Any]:
    """How the run was asked for, as the results file keeps it."""
    return {key: value for key, value in vars(args).items() if key not in ("results_dir", "no_results")}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma-separated, from: " + ", ".join(SYSTEMS)
    )
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=10_000, help="backlog, and jobs per enqueue measurement")
    parser.add_argument(
        "--enqueue-seconds", type=float, default=1.5, help="time box of each enqueue measurement"
    )
    parser.add_argument("--drain-seconds", type=float, default=5.0, help="time box of each drain")
    parser.add_argument("--paced-seconds", type=float, default=4.0, help="duration of the paced load")
    parser.add_argument(
        "--scaling-seconds", type=float, default=2.5, help="time box of each drain with 1 and 4 processes"
    )
    parser.add_argument(
        "--processes", type=int, default=os.cpu_count() or 1, help="worker processes (the cores)"
    )
    parser.add_argument(
        "--scaling", default="1,2,4", help="worker process counts for the drain ('' for none)"
    )
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=570.0,
        help="a run skips its scaling drains when with them the whole run would end past this, each "
        "run taking as long as its system's last (0: no budget)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run of about a minute: small, once, no scaling"
    )
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/bench")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument(
        "--redis-dbs",
        default="8,9,10,11",
        help="database numbers: the project's, stock Celery's, Dramatiq's, Huey's",
    )
    parser.add_argument("--rabbitmq-url", default="amqp://guest:guest@127.0.0.1:5672/bench")
    parser.add_argument("--results-dir", type=Path, help="where bench.json goes (default docs/results)")
    parser.add_argument("--no-results", action="store_true", help="print the table, write no results file")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if parser.get_default(key) == getattr(args, key):
                setattr(args, key, value)
        if parser.get_default("scaling") == args.scaling:
            args.scaling = ""
    args.systems = [name.strip().replace("-", "_") for name in args.systems.split(",") if name.strip()]
    unknown = [name for name in args.systems if name not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    args.scaling = [int(item) for item in args.scaling.split(",") if item.strip()]
    args.redis_dbs = [int(item) for item in args.redis_dbs.split(",")]
    if len(args.redis_dbs) != 4:
        parser.error("--redis-dbs: four database numbers (the project, stock Celery, Dramatiq, Huey)")
    return args


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _terminated)
    from bench.support import RESULTS_DIR, ensure_database, service_versions, write_results

    run_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    runner = Runner(args, run_dir)
    systems: list[str] = args.systems
    print(
        f"python -m bench: {', '.join(systems)}; {args.repetitions} repetition(s), "
        f"backlog {args.jobs:,}, {args.processes} worker processes, drain <= {args.drain_seconds:g} s, "
        f"paced {args.paced_seconds:g} s, scaling {args.scaling or 'off'}; logs in {run_dir}",
        flush=True,
    )
    if any(SYSTEMS[name][1] in PEER_VENV_KINDS for name in systems):
        from bench.peers import venv

        runner.peer_python = str(venv.ensure())
    if any(SYSTEMS[name][2] == "rabbitmq" for name in systems):
        fresh_vhost(args.rabbitmq_url)
    if any(SYSTEMS[name][1] == "project" for name in systems):
        ensure_database(args.database_url)
        first = next(name for name in systems if SYSTEMS[name][1] == "project")
        if "error" in runner.run(first, 0, prepare=True):
            return 1

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    plan = [
        (repetition, name)
        for repetition in range(1, args.repetitions + 1)
        for name in systems[(repetition - 1) % len(systems) :] + systems[: (repetition - 1) % len(systems)]
    ]
    try:
        for index, (repetition, name) in enumerate(plan):
            if index == 0 or plan[index - 1][0] != repetition:
                order = [item for number, item in plan if number == repetition]
                print(f"repetition {repetition}/{args.repetitions}: {', '.join(order)}", flush=True)
            runner.scaling_on = scaling_fits(runs, plan[index:], args.budget_seconds)
            if not runner.scaling_on and SYSTEMS[name][5] and args.scaling:
                print(f"    {name}: no scaling drains in this run (--budget-seconds {args.budget_seconds:g})")
            started = time.monotonic()
            run = runner.run(name, repetition)
            run["seconds"] = time.monotonic() - started
            run["repetition"] = repetition
            runs[name].append(run)
    except KeyboardInterrupt:
        print("interrupted: every worker was stopped; nothing written", file=sys.stderr)
        return 130

    elapsed = time.monotonic() - STARTED
    figures = assemble(runs, elapsed)
    print()
    print(report.table(figures["systems"], figures["labels"]))
    for line in report.notes(figures["systems"], figures["ratios"]):
        print(line)
    print(f"elapsed {elapsed:.0f} s ({elapsed / 60:.1f} min)")
    if args.no_results:
        return 0
    services = service_versions(args.database_url, redis_url(args.redis_url, args.redis_dbs[0]))
    if any(SYSTEMS[name][2] == "rabbitmq" for name in systems):
        services["rabbitmq"] = rabbitmq_version()
    params = results_params(args)
    write_results("bench", figures, params, services=services, directory=args.results_dir or RESULTS_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
