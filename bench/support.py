"""What the benchmarks share: a PostgreSQL database of their own, a real worker process, memory sampling,
and the results file each one writes (docs/results/<name>.json)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent


def ensure_database(url: str) -> None:
    parts = urlsplit(url)
    if not parts.scheme.startswith("postgres"):
        return
    import psycopg

    name = parts.path.lstrip("/")
    admin = parts._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            connection.execute(f'CREATE DATABASE "{name}"')


def setup_django(database_url: str, broker_url: str, **environ: str) -> None:
    """Production settings (config.settings.base) on the bench's own database and broker, migrated."""
    ensure_database(database_url)
    os.environ.update(
        DJANGO_SETTINGS_MODULE="config.settings.base", DATABASE_URL=database_url, CELERY_BROKER_URL=broker_url
    )
    os.environ.update(environ)
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-not-a-secret")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


class TreeSampler:
    """Peak of the summed RSS of a process and its descendants, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                processes = [self.root, *self.root.children(recursive=True)]
                total = 0
                for process in processes:
                    with contextlib.suppress(psutil.Error):  # a child that just exited
                        total += process.memory_info().rss
                self.peak = max(self.peak, total)
            except psutil.Error:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


@contextlib.contextmanager
def worker_process(app: Any, queue: str, concurrency: int) -> Iterator[subprocess.Popen[bytes]]:
    """`celery -A config worker -Q <queue> -c <concurrency>` as a process, answering pings, stopped after."""
    log = Path(tempfile.gettempdir()) / f"bench_{queue}_worker.log"
    app.control.purge()
    with log.open("w") as log_file:
        worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", queue, "-n", "bench@%h"),
                *("-c", str(concurrency), "--without-mingle", "--without-gossip"),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not any(
            name.startswith("bench@") for reply in app.control.ping(timeout=0.5) or [] for name in reply
        ):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker did not start; see {log}")
        yield worker
    finally:
        worker.terminate()
        worker.wait(timeout=60)


# --- results files: what every benchmark writes at the end, and docs/benchmarks.md is rendered from ---

# BENCH_RESULTS_DIR: somewhere else, for a trial run whose numbers are not to be published.
RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR", ROOT / "docs" / "results"))
# Written by the benchmarks and rendered from them: a run does not make the code it measured "dirty".
NOT_CODE = ("docs/results", "docs/benchmarks.md")
_STARTED = time.monotonic()


def _redacted(text: str) -> str:
    """A URL's password replaced by ***, so a command line or parameter can be committed."""
    return re.sub(r"(://[^:/@\s]+):[^@/\s]+@", r"\1:***@", text)


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def commit() -> dict[str, Any]:
    """The commit the code came from, and whether the tree had changes to it (results files aside)."""
    excluded = [f":(exclude){path}" for path in NOT_CODE]
    try:
        sha = _git("rev-parse", "HEAD")
        changed = _git("status", "--porcelain", "--", ".", *excluded)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": True}
    return {"commit": sha, "dirty": bool(changed)}


def _first(path: str, pattern: str) -> str:
    with contextlib.suppress(OSError):
        found = re.search(pattern, Path(path).read_text(), re.MULTILINE)
        if found:
            return found[1].strip()
    return "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on (no host name)."""
    memory_kib = _first("/proc/meminfo", r"^MemTotal:\s+(\d+)")
    return {
        "cpu": _first("/proc/cpuinfo", r"^model name\s*:\s*(.+)$"),
        "cores": os.cpu_count(),
        "ram_gib": round(int(memory_kib) / 2**20, 1) if memory_kib.isdigit() else None,
        "os": _first("/etc/os-release", r'^PRETTY_NAME="?([^"\n]+)"?'),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }


def service_versions(database_url: str | None = None, redis_url: str | None = None) -> dict[str, str]:
    """Server versions of the database and Redis a benchmark used ("unreachable" if they do not answer)."""
    versions: dict[str, str] = {}
    if database_url and urlsplit(database_url).scheme.startswith("postgres"):
        try:
            import psycopg

            with psycopg.connect(database_url, connect_timeout=5) as connection:
                row = connection.execute("SHOW server_version").fetchone()
                versions["postgresql"] = str(row[0]) if row else "unknown"
        except Exception as exc:
            versions["postgresql"] = f"unreachable ({type(exc).__name__})"
    elif database_url and database_url.startswith("sqlite"):
        import sqlite3

        versions["sqlite"] = sqlite3.sqlite_version
    if redis_url:
        try:
            import redis

            info = redis.Redis.from_url(redis_url, socket_timeout=5).info("server")
            if "valkey_version" in info:
                versions["valkey"] = str(info["valkey_version"])
            else:
                versions["redis"] = str(info["redis_version"])
        except Exception as exc:
            versions["redis"] = f"unreachable ({type(exc).__name__})"
    return versions


def command_line() -> str:
    """How this benchmark was started, as `python -m bench.<name> ...` or `python -m bench ...` (passwords
    in URLs hidden)."""
    stem = Path(sys.argv[0]).stem
    module = "bench" if stem == "__main__" else f"bench.{stem}"
    return _redacted(shlex.join(["python", "-m", module, *sys.argv[1:]]))


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {str(key): _rounded(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(item) for item in value]
    if isinstance(value, str):
        return _redacted(value)
    return value


def write_results(
    name: str,
    figures: dict[str, Any],
    params: dict[str, Any],
    *,
    database_url: str | None = None,
    redis_url: str | None = None,
    services: dict[str, str] | None = None,
    directory: Path = RESULTS_DIR,
) -> Path:
    """Writes docs/results/<name>.json: when, on what, from which commit, how, and the figures.

    `python -m bench.publish` renders docs/benchmarks.md from these files; nothing else does.
    """
    results = {
        "name": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "services": services or service_versions(database_url, redis_url)},
        **commit(),
        "command": command_line(),
        "run_seconds": round(time.monotonic() - _STARTED, 1),
        "params": _rounded(params),
        "figures": _rounded(figures),
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"results written to {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path
