"""The embedded broker `bin/run` starts keeps its data across a restart, even a kill (AOF, everysec)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from localdev import stack
from localdev.embedded_broker import EmbeddedBroker, free_port

# The stack's own Valkey (localdev.embedded_broker), whatever broker the suite runs on.
pytestmark = [pytest.mark.integration, pytest.mark.requires_redis_broker]


def test_the_stacks_broker_keeps_queued_messages_across_a_kill_and_a_restart(tmp_path: Path) -> None:
    port = free_port()
    broker = stack.embedded_broker({"EMBEDDED_BROKER_PORT": str(port)}, state=tmp_path)
    assert broker.persist and broker.port == port
    broker.start()
    try:
        client = redis.Redis(port=port)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        client.lpush("email", *[f"message {n}" for n in range(100)])
        client.close()
        assert broker.process is not None
        broker.process.kill()  # SIGKILL: no shutdown, no final flush
        broker.process.wait()

        broker.start()  # the same directory: it reads its append-only file back
        assert redis.Redis(port=port).llen("email") == 100
    finally:
        broker.stop()


def test_a_broker_without_persistence_comes_back_empty(tmp_path: Path) -> None:
    """What production loses without AOF: every message that was queued and not yet taken."""
    broker = EmbeddedBroker(free_port(), tmp_path / "broker", persist=False)
    broker.start()
    try:
        redis.Redis(port=broker.port).lpush("email", "message")
        broker.stop()
        broker.start()
        assert redis.Redis(port=broker.port).llen("email") == 0
    finally:
        broker.stop()
