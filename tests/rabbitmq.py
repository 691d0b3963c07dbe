"""The RabbitMQ the tests that need one use: RABBITMQ_URL, else the machine's (guest/guest).

Also the faults a test may cause on it. The server may be shared (other vhosts, other users):
the connections a test closes are those of one vhost only (`close_connections`); restarting
the whole server (`restart_app`) is allowed only where RABBITMQ_MAY_RESTART=1 says the server
is the test run's own (as in CI).
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import time
from urllib.parse import unquote, urlsplit

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def rabbitmq_answers() -> bool:
    parts = urlsplit(RABBITMQ_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=1):
            return True
    except OSError:
        return False


def vhost_of(url: str) -> str:
    """The vhost an amqp:// URL names (kombu's rule: no path, or "/", is the default vhost "/")."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def rabbitmqctl_works() -> bool:
    """rabbitmqctl is installed and may talk to the local node (it needs its Erlang cookie)."""
    if shutil.which("rabbitmqctl") is None:
        return False
    done = subprocess.run(["rabbitmqctl", "-q", "status"], capture_output=True, timeout=60)
    return done.returncode == 0


def _ctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def connections(vhost: str) -> list[str]:
    """The pids (as rabbitmqctl names them) of the client connections to `vhost`."""
    rows = _ctl("list_connections", "--no-table-headers", "vhost", "pid").splitlines()
    return [row.split("\t")[1] for row in rows if "\t" in row and row.split("\t")[0] == vhost]


def close_connections(vhost: str, reason: str = "closed by a fault test") -> int:
    """Closes every client connection to `vhost` (and only those), as a broker failing over does;
    returns how many there were."""
    there = len(connections(vhost))
    _ctl("close_all_connections", "--vhost", vhost, "--limit", "100000", reason)
    return there


def may_restart() -> bool:
    return os.environ.get("RABBITMQ_MAY_RESTART") == "1"


def restart_app(down_seconds: float = 3.0) -> None:
    """`rabbitmqctl stop_app`, a pause, `start_app`: the node restarts, every vhost with it.

    Durable queues and persistent messages survive it; every connection drops. Only where
    RABBITMQ_MAY_RESTART=1 (the server is the test run's own)."""
    assert may_restart(), "RABBITMQ_MAY_RESTART=1 is not set: the server may be shared"
    _ctl("stop_app")
    time.sleep(down_seconds)
    _ctl("start_app")
    _ctl("await_startup")


@functools.cache
def _ctl_answers() -> bool:
    return rabbitmqctl_works()


def skip_unless_rabbitmqctl() -> None:
    """Skips the calling test, naming why, where rabbitmqctl cannot reach the local node."""
    import pytest

    if not _ctl_answers():
        pytest.skip("rabbitmqctl is missing or cannot reach the local RabbitMQ node (its Erlang cookie)")


def unacknowledged(vhost: str, queue: str) -> int:
    """Messages of `queue` delivered and not acknowledged yet (AMQP itself does not say; rabbitmqctl does)."""
    rows = _ctl("list_queues", "--no-table-headers", "-p", vhost, "name", "messages_unacknowledged")
    counts = {row.split("\t")[0]: int(row.split("\t")[1]) for row in rows.splitlines() if "\t" in row}
    return counts.get(queue, 0)
