"""Fetch throughput and idle latency: kombu's stock Redis transport against delivery.redis.

    python -m bench.delivery_fetch redis://127.0.0.1:6379/3 [messages]

Throughput: `messages` are queued first, then one kombu consumer (prefetch 1, as a
Celery worker process with prefetch multiplier 1) receives and acks each.
Latency: an idle consumer, a publisher sending one message every 20 ms stamped
with its send time; receive minus send, 300 samples. Queues are named per run
and deleted afterwards. Writes the figures to docs/results/delivery.json.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import uuid
from typing import Any

import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from bench.support import write_results
from delivery.redis import Transport

OPTIONS = {"priority_steps": list(range(10))}  # as the project's settings
# label: (transport, key in the results file)
TRANSPORTS: dict[str, tuple[Any, str]] = {
    "kombu (BRPOP + MULTI)": ("redis", "kombu"),
    "delivery.redis (Lua fetch)": (Transport, "delivery_redis"),
}


def _queue() -> Queue:
    name = f"bench-fetch-{uuid.uuid4().hex[:8]}"
    return Queue(name, Exchange(name), routing_key=name)


def throughput(url: str, transport: Any, messages: int) -> float:
    queue = _queue()
    with Connection(url) as producer_connection:
        producer = Producer(producer_connection)
        for n in range(messages):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=queue.name, declare=[queue])
    received = 0

    def on_message(body: Any, message: Any) -> None:
        nonlocal received
        received += 1
        message.ack()

    conn = Connection(url, transport=transport, transport_options=OPTIONS)
    with conn, Consumer(conn, [queue], callbacks=[on_message], accept=["json"], prefetch_count=1):
        started = time.perf_counter()
        while received < messages:
            conn.drain_events(timeout=10)
        elapsed = time.perf_counter() - started
    return messages / elapsed


def latency(url: str, transport: Any, samples: int = 300) -> list[float]:
    queue = _queue()
    delays: list[float] = []

    def on_message(body: Any, message: Any) -> None:
        delays.append(time.perf_counter() - body["sent"])
        message.ack()

    def publish() -> None:
        with Connection(url) as producer_connection:
            producer = Producer(producer_connection)
            for _ in range(samples):
                time.sleep(0.02)
                producer.publish(
                    {"sent": time.perf_counter()},
                    exchange=queue.exchange,
                    routing_key=queue.routing_key,
                    declare=[queue],
                )

    conn = Connection(url, transport=transport, transport_options=OPTIONS)
    with conn, Consumer(conn, [queue], callbacks=[on_message], accept=["json"], prefetch_count=1):
        publisher = threading.Thread(target=publish)
        publisher.start()
        while len(delays) < samples:
            conn.drain_events(timeout=10)
        publisher.join()
    return delays


def main(url: str, messages: int) -> None:
    figures: dict[str, Any] = {}
    for name, (transport, key) in TRANSPORTS.items():
        rate = throughput(url, transport, messages)
        delays = sorted(latency(url, transport))
        p50 = statistics.median(delays) * 1000
        p99 = delays[int(len(delays) * 0.99) - 1] * 1000
        print(f"{name:28} {rate:8.0f} msg/s   idle latency p50 {p50:.2f} ms  p99 {p99:.2f} ms")
        figures[key] = {"messages_per_s": rate, "idle_latency_p50_ms": p50, "idle_latency_p99_ms": p99}
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match="*bench-fetch-*"):
        client.delete(key)
    write_results(
        "delivery", figures, {"redis_url": url, "messages": messages, "latency_samples": 300}, redis_url=url
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5000)
