"""What the benchmarks share: a PostgreSQL database of their own, a real worker process, memory sampling."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
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
