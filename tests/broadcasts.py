"""Control broadcasts (inspect, ping, cancel_consumer...) seen on the real broker.

Kombu's Redis transport publishes every broadcast to the pidbox fanout exchange as a Redis
PUBLISH on the channel `/<db>.celery.pidbox`; a pattern subscription on the broker's own
database sees each one, whoever sends it.
"""

from __future__ import annotations

import time
from types import TracebackType
from urllib.parse import urlsplit

import redis


class BroadcastRecorder:
    def __init__(self, broker_url: str) -> None:
        parts = urlsplit(broker_url)
        db = (parts.path or "/0").lstrip("/") or "0"
        self.client = redis.Redis.from_url(broker_url)
        self.pubsub = self.client.pubsub()
        self.pattern = f"/{db}.*pidbox*"
        self.seen: list[bytes] = []

    def __enter__(self) -> BroadcastRecorder:
        self.pubsub.psubscribe(self.pattern)
        # The subscription is in place once Redis confirms it.
        while (message := self.pubsub.get_message(timeout=1.0)) is None or message["type"] != "psubscribe":
            pass
        return self

    def broadcasts(self, settle: float = 0.5) -> list[bytes]:
        """Every broadcast published since the recorder started (waiting `settle` s for stragglers)."""
        deadline = time.monotonic() + settle
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.pubsub.get_message(timeout=remaining)
            if message is not None and message["type"] == "pmessage":
                self.seen.append(message["data"])
        return self.seen

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.pubsub.close()
        self.client.close()
