"""Start-up time and idle memory of the development stack, started as `bin/run` starts it.

    .venv/bin/python -m bench.stack [--idle 20] [--timeout 180]

Copies the project to a temporary directory as a fresh clone has it (tests/project_copy.py: no
.git, .venv, .run/, .env, database or media), then runs `python -m localdev.stack` there (what
`bin/run` executes once its virtualenv is ready) with this Python, in its own session as a
terminal's foreground job, with nothing of this shell's project settings (no DATABASE_URL,
CELERY_BROKER_URL...): SQLite in the copy, the embedded broker, the Procfile's defaults for
concurrency, on free ports (WEB_BIND, FLOWER_PORT, EMBEDDED_BROKER_PORT) so that it cannot meet
another stack. Then:

1. start-up: seconds from starting the command to its "stack ready" line (migrations of a new
   database, the admin user and API token included), and the figure the stack prints itself;
2. idle memory after --idle seconds with nothing to do: the PSS of every process of the stack
   (/proc/<pid>/smaps_rollup: shared pages divided among the processes sharing them, so the sum
   is what the stack costs the machine), per process, per role and in total;
3. a `default.ping` through the embedded broker and a worker, from a second process (after the
   memory is read, so it does not count);
4. Ctrl-C (SIGINT to the process group, as a terminal sends it): seconds until the stack exits,
   and whether anything it started is still running 10 s later (anything left is named, then
   killed by this script).
Prints all of it and writes it to docs/results/stack.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.support import service_versions, write_results  # noqa: E402
from localdev.embedded_broker import free_port, is_listening  # noqa: E402
from tests.processes import alive, descendants  # noqa: E402
from tests.project_copy import copy_project  # noqa: E402

# Set for this project by a shell or a test run, not by a developer starting bin/run on a fresh clone.
NOT_IN_A_FRESH_TERMINAL = (
    "DJANGO_SETTINGS_MODULE",
    "DJANGO_READ_DOT_ENV_FILE",
    "DJANGO_SECRET_KEY",
    "DJANGO_DEBUG",
    "CELERY_BROKER_URL",
    "REDIS_URL",
    "DATABASE_URL",
    "WEB_CONCURRENCY",
    "CELERY_WORKER_CONCURRENCY",
    "METRICS_REDIS_URL",
    "RATE_LIMIT_STORAGE_URL",
    "VIRTUAL_ENV",
)

# (role, how to recognise it in the command line), the first that matches; honcho's shells first,
# since their command line holds the command they run.
ROLES = (
    ("shell", r"^(/bin/)?sh -c"),
    ("broker", r"valkey-server|redis-server"),
    ("stack", r"-m localdev\.stack"),
    ("web", r"gunicorn"),
    ("worker_email", r"celery .*worker .*-n email@|celeryd: email@"),  # the second: with setproctitle
    ("worker_general", r"celery .*worker .*-n general@|celeryd: general@"),
    ("beat", r"celery .*beat"),
    ("flower", r"celery .*flower"),
)


# Roles whose children are forks of the main process: gunicorn's workers, prefork pool children,
# and honcho's one process per Procfile line, which starts its command and waits for it.
FORKED = ("stack", "web", "worker_email", "worker_general")


def command_of(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    return ""


def parent_of(pid: int) -> int:
    with contextlib.suppress(OSError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return 0


def memory_kib(pid: int) -> dict[str, int]:
    """Pss and Rss of a process from /proc/<pid>/smaps_rollup, in KiB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Pss", "Rss"):
            found[name.lower()] = int(rest.split()[0])
    return found


def plain_role(command: str) -> str:
    return next((role for role, pattern in ROLES if re.search(pattern, command)), "other")


def role_of(pid: int, command: str) -> str:
    """The stack's part a process plays; for the forking ones, main process or child."""
    role = plain_role(command)
    if role in FORKED:
        # A prefork pool child or a gunicorn worker is a fork of a process in the same role.
        return f"{role}_child" if plain_role(command_of(parent_of(pid))) == role else f"{role}_main"
    return role


def idle_memory(stack_pid: int) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    processes: list[dict[str, Any]] = []
    for pid in sorted({stack_pid, *descendants(stack_pid)}):
        command = command_of(pid)
        try:
            memory = memory_kib(pid)
        except OSError:  # exited in between
            continue
        processes.append(
            {
                "pid": pid,
                "role": role_of(pid, command),
                "command": command[:160],
                "pss_mib": memory.get("pss", 0) / 1024,
                "rss_mib": memory.get("rss", 0) / 1024,
            }
        )
    # Every role, even one with no process (a fixed shape for docs/benchmarks.md's table).
    names = [
        name
        for role, _ in ROLES
        for name in ((f"{role}_main", f"{role}_child") if role in FORKED else (role,))
    ]
    roles: dict[str, dict[str, Any]] = {
        name: {"processes": 0, "pss_mib": 0.0, "each_pss_mib": []} for name in [*names, "other"]
    }
    for process in processes:
        role = roles[process["role"]]
        role["processes"] += 1
        role["pss_mib"] += process["pss_mib"]
        role["each_pss_mib"].append(process["pss_mib"])
    return processes, roles


def ping(project: Path, env: dict[str, str], broker_url: str) -> float:
    """Seconds for `default.ping` to go through the broker and a worker and come back, sent from a
    second process in the project copy (its interpreter start and Django set-up not counted)."""
    code = (
        "import time, django; from config.celery_app import app; django.setup(); "
        "began = time.perf_counter(); app.send_task('default.ping').get(timeout=60); "
        "print(time.perf_counter() - began)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=project,
        env={**env, "CELERY_BROKER_URL": broker_url},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--idle", type=float, default=20, help="seconds idle after ready before measuring")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for 'stack ready'")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("reads processes and their memory from /proc: Linux only")

    work = Path(tempfile.mkdtemp(prefix="bench_stack_"))
    project = copy_project(work / "project")
    web_port, flower_port, broker_port = free_port(), free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if key not in NOT_IN_A_FRESH_TERMINAL}
    env.update(
        WEB_BIND=f"127.0.0.1:{web_port}", FLOWER_PORT=str(flower_port), EMBEDDED_BROKER_PORT=str(broker_port)
    )
    broker_url = f"redis://127.0.0.1:{broker_port}/0"
    log = work / "stack.log"
    print(
        f"python -m localdev.stack in {project}; "
        f"web :{web_port}, Flower :{flower_port}, broker :{broker_port}"
    )

    with log.open("w") as log_file:
        started = time.monotonic()
        stack = subprocess.Popen(
            [sys.executable, "-m", "localdev.stack"],
            cwd=project,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
    everything: set[int] = set()
    try:
        reported = None
        while reported is None:
            text = log.read_text(errors="replace")
            if found := re.search(r"stack ready in ([0-9.]+)s", text):
                reported = float(found[1])
                break
            if stack.poll() is not None:
                raise SystemExit(
                    f"the stack exited ({stack.returncode}) before it was ready:\n{text[-3000:]}"
                )
            if time.monotonic() - started > args.timeout:
                raise SystemExit(f"the stack was not ready in {args.timeout:g} s:\n{text[-3000:]}")
            time.sleep(0.1)
        ready = time.monotonic() - started
        print(f"stack ready: {ready:.1f} s from the command (the stack says {reported:.1f} s)")
        services = service_versions(redis_url=broker_url)

        time.sleep(args.idle)
        processes, roles = idle_memory(stack.pid)
        everything = {process["pid"] for process in processes} - {stack.pid}
        total_pss = sum(process["pss_mib"] for process in processes)
        total_rss = sum(process["rss_mib"] for process in processes)
        print(f"idle memory after {args.idle:g} s: PSS {total_pss:.0f} MiB over {len(processes)} processes")
        for process in processes:
            print(f"  {process['pss_mib']:7.1f} MiB  {process['role']:<22} {process['command'][:90]}")
        for role, figures in roles.items():
            print(f"  {role:<22} {figures['processes']:>2} process(es) {figures['pss_mib']:7.1f} MiB")

        round_trip = ping(project, env, broker_url)
        print(f"default.ping through the embedded broker and a worker: {round_trip * 1000:.0f} ms")
        everything |= descendants(stack.pid)

        stopping = time.monotonic()
        os.killpg(stack.pid, signal.SIGINT)  # Ctrl-C in the terminal
        exit_code = stack.wait(timeout=60)
        stopped_in = time.monotonic() - stopping
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(pid) for pid in everything):
            time.sleep(0.2)
        left = [pid for pid in sorted(everything) if alive(pid)]
        left_commands = [command_of(pid)[:160] for pid in left]
        broker_still_listening = is_listening("127.0.0.1", broker_port)
        print(
            f"Ctrl-C: the stack exited {exit_code} in {stopped_in:.1f} s; "
            f"left running 10 s later: {len(left)} {left_commands or ''}; "
            f"broker port still open: {broker_still_listening}"
        )
    finally:
        for pid in {stack.pid, *everything, *descendants(stack.pid)}:
            if alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            stack.wait(timeout=10)
    print(f"log: {log}")

    figures = {
        "ready_s": ready,
        "ready_s_reported_by_stack": reported,
        "idle_s": args.idle,
        "processes": len(processes),
        "idle_pss_mib_total": total_pss,
        "idle_rss_mib_sum": total_rss,
        "roles": roles,
        "by_process": [{key: value for key, value in p.items() if key != "pid"} for p in processes],
        "ping_round_trip_ms": round_trip * 1000,
        "ctrl_c_exit_code": exit_code,
        "ctrl_c_stopped_in_s": stopped_in,
        "left_running": len(left),
        "left_running_commands": left_commands,
        "broker_port_open_after_stop": broker_still_listening,
    }
    params = {
        **vars(args),
        "database": "SQLite in the project copy (the stack's default)",
        "broker": "embedded (the stack's default)",
        "concurrency": "the Procfile's defaults (WEB_CONCURRENCY 2, worker -c = cores)",
    }
    write_results("stack", figures, params, services={"sqlite": sqlite_version(), **services})


def sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version


if __name__ == "__main__":
    main()
