"""The RabbitMQ the tests that need one use: RABBITMQ_URL, else the machine's (guest/guest)."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def rabbitmq_answers() -> bool:
    parts = urlsplit(RABBITMQ_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=1):
            return True
    except OSError:
        return False
