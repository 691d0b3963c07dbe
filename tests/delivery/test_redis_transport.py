"""The reliable Redis transport (delivery/redis.py) against a real Redis, then under real workers.

Unit-level tests open kombu connections on the transport with their own queue
names and key prefix (so they share the broker with nothing); the integration
tests at the end run `celery -A config worker` processes as the Procfile does.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from kombu import Connection, Consumer, Exchange, Producer, Queue

from delivery import redis as delivery_redis
from delivery.redis import DELIVERY_COUNT_HEADER, QUARANTINE_KEY, Transport
from tests import probes
from tests.processes import descendants
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = pytest.mark.requires_redis_broker  # the Redis transport itself


def channel_of(connection: Connection) -> Any:
    """The transport's channel (typed Any: kombu's stubs know only the generic channel)."""
    return connection.default_channel


class Broker:
    """One test's corner of the real broker: its own queue names, key prefix and quarantine list."""

    def __init__(self) -> None:
        self.url = settings.CELERY_BROKER_URL
        self.name = f"dt-{uuid.uuid4().hex[:8]}"
        self.redis = redis.Redis.from_url(self.url)
        self.exchange = Exchange(self.name, type="direct")
        self.connections: list[Connection] = []

    def queue(self, suffix: str = "q") -> Queue:
        return Queue(f"{self.name}-{suffix}", self.exchange, routing_key=f"{self.name}-{suffix}")

    @property
    def quarantine_key(self) -> str:
        return f"{self.name}:quarantine"

    def connect(self, **options: Any) -> Connection:
        transport_options = {
            "delivery_keyprefix": f"{self.name}:",
            "quarantine_key": self.quarantine_key,
            "priority_steps": list(range(10)),
            "consumer_heartbeat_interval": 0.2,
            "consumer_heartbeat_lapse": 1.0,
            **options,
        }
        connection = Connection(self.url, transport=Transport, transport_options=transport_options)
        self.connections.append(connection)
        return connection

    def publish(self, queue: Queue, body: Any, priority: int | None = 0) -> None:
        # kombu's stock producer, on the project's priority lists (a producer with other steps would
        # file some priorities together).
        # None: no priority (Celery's messages always carry one; kombu's Producer says 0 unless told).
        options: dict[str, Any] = {"priority": priority}
        with Connection(self.url, transport_options={"priority_steps": list(range(10))}) as connection:
            Producer(connection).publish(
                body,
                exchange=self.exchange,
                routing_key=queue.routing_key,
                declare=[queue],
                **options,
            )

    def lpush(self, queue: Queue, raw: bytes | str) -> None:
        self.redis.lpush(queue.name, raw)

    def quarantined(self) -> list[dict[str, Any]]:
        return [json.loads(entry) for entry in self.redis.lrange(self.quarantine_key, 0, -1)]

    def inflight(self, connection: Connection) -> set[Any]:
        return self.redis.smembers(channel_of(connection).inflight_key)

    def close(self) -> None:
        for connection in self.connections:
            connection.release()
        keys = list(self.redis.scan_iter(match=f"{self.name}*"))
        if keys:
            self.redis.delete(*keys)
        self.redis.close()


@pytest.fixture
def broker() -> Iterator[Broker]:
    corner = Broker()
    yield corner
    corner.close()


class Inbox:
    """A kombu consumer that keeps what it receives; `next()` drains until a message arrives."""

    def __init__(self, connection: Connection, queues: list[Queue], no_ack: bool = False) -> None:
        self.connection = connection
        self.messages: list[Any] = []
        self.consumer = Consumer(
            connection, queues, callbacks=[self._on_message], accept=["json"], no_ack=no_ack
        )
        self.consumer.consume()

    def _on_message(self, body: Any, message: Any) -> None:
        self.messages.append(message)

    def next(self, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while not self.messages:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no message within {timeout} s")
            with contextlib.suppress(TimeoutError):
                self.connection.drain_events(timeout=remaining)
        return self.messages.pop(0)

    def nothing(self, seconds: float) -> bool:
        try:
            self.next(timeout=seconds)
        except AssertionError:
            return True
        return False


# --- the atomic fetch ------------------------------------------------------------------


def test_a_fetch_records_the_message_in_flight_in_the_same_step_as_it_pops_it(broker: Broker) -> None:
    queue = broker.queue()
    broker.publish(queue, {"n": 1})
    connection = broker.connect()
    channel = channel_of(connection)
    queue(channel).declare()
    channel.basic_consume(queue.name, False, lambda message: None, "ctag")

    # Send the fetch and never read its reply, as a worker SIGKILLed right after it would.
    channel.connection.cycle._register_BRPOP(channel)  # connects and sends the fetch
    wait_for(lambda: broker.redis.llen(queue.name) == 0, timeout=5, what="the fetch to run")

    tags = broker.inflight(connection)
    assert len(tags) == 1
    tag = tags.pop()
    record = json.loads(broker.redis.hget(channel.unacked_key, tag) or b"")
    assert record[0]["properties"]["delivery_tag"] == tag.decode()
    assert record[1:] == [broker.name, queue.routing_key]
    assert broker.redis.zscore(channel.unacked_index_key, tag) is not None
    broker.redis.hdel(channel.unacked_key, tag)
    broker.redis.zrem(channel.unacked_index_key, tag)


def test_an_ack_removes_the_message_from_every_in_flight_record(broker: Broker) -> None:
    queue = broker.queue()
    broker.publish(queue, {"n": 1})
    connection = broker.connect()
    inbox = Inbox(connection, [queue])

    message = inbox.next()
    assert broker.inflight(connection) == {message.delivery_tag.encode()}
    message.ack()

    channel = channel_of(connection)
    assert broker.inflight(connection) == set()
    assert broker.redis.hget(channel.unacked_key, message.delivery_tag) is None
    assert broker.redis.zscore(channel.unacked_index_key, message.delivery_tag) is None


def test_an_ack_the_broker_does_not_take_frees_the_slot_and_is_sent_again_before_the_next_fetch(
    broker: Broker,
) -> None:
    """kombu records an ack locally only after Redis took it: an ack during a frozen broker kept the
    prefetch slot held for good, and a worker whose slots were all held that way never fetched again
    (the fault suite's frozen-broker scenario: 140 of 150 jobs stuck)."""
    queue = broker.queue()
    broker.publish(queue, {"n": 1})
    broker.publish(queue, {"n": 2})
    connection = broker.connect()
    channel = channel_of(connection)
    channel.basic_qos(0, 1, False)  # one message at a time
    inbox = Inbox(connection, [queue])
    first = inbox.next()
    assert not channel.qos.can_consume()

    # A broker that does not answer: a real connection, refused (nothing listens on port 1).
    answering = channel.pool
    channel._pool = redis.ConnectionPool(host="127.0.0.1", port=1, socket_connect_timeout=1)
    try:
        first.ack()  # no exception reaches the caller
    finally:
        channel._pool = answering

    assert channel.qos.can_consume()  # the slot is free: the consumer goes on
    assert broker.redis.hget(channel.unacked_key, first.delivery_tag) is not None  # not in Redis yet
    second = inbox.next()  # the next fetch sends the ack first
    assert second.payload == {"n": 2}
    assert broker.redis.hget(channel.unacked_key, first.delivery_tag) is None
    assert first.delivery_tag.encode() not in broker.inflight(connection)
    second.ack()


def test_a_rejected_message_comes_back_redelivered_with_its_delivery_count_raised(broker: Broker) -> None:
    queue = broker.queue()
    broker.publish(queue, {"n": 1})
    connection = broker.connect()
    inbox = Inbox(connection, [queue])

    first = inbox.next()
    assert DELIVERY_COUNT_HEADER not in first.headers  # absent: the first delivery
    first.reject(requeue=True)
    second = inbox.next()
    second.reject(requeue=True)
    third = inbox.next()

    assert third.payload == {"n": 1}
    assert second.headers[DELIVERY_COUNT_HEADER] == 2
    assert third.headers[DELIVERY_COUNT_HEADER] == 3
    assert third.headers["redelivered"] is True
    assert third.delivery_info["redelivered"] is True
    assert len({first.delivery_tag, second.delivery_tag, third.delivery_tag}) == 3
    third.ack()
    assert broker.inflight(connection) == set()


def test_the_visibility_timeout_restore_also_counts_the_delivery(broker: Broker) -> None:
    queue = broker.queue()
    broker.publish(queue, {"n": 1})
    connection = broker.connect(visibility_timeout=0.5)
    inbox = Inbox(connection, [queue])
    first = inbox.next()
    time.sleep(1)

    channel_of(connection).qos.restore_visible(num=100, interval=1)

    again = inbox.next()
    assert again.payload == {"n": 1}
    assert again.headers[DELIVERY_COUNT_HEADER] == 2
    assert again.delivery_tag != first.delivery_tag
    again.ack()


def test_closing_the_channel_returns_its_unacked_messages_and_signs_the_consumer_off(broker: Broker) -> None:
    queue = broker.queue()
    broker.publish(queue, {"n": 1})
    connection = broker.connect()
    inbox = Inbox(connection, [queue])
    inbox.next()
    channel = channel_of(connection)

    connection.release()  # as a warm shutdown does

    assert broker.redis.llen(queue.name) == 1
    assert broker.redis.smembers(channel.inflight_key) == set()
    assert not broker.redis.exists(channel.heartbeat_key)
    assert broker.redis.zscore(channel.registry_key, channel.consumer_id) is None


def test_an_ack_after_the_connection_was_torn_down_is_dropped_not_raised(broker: Broker) -> None:
    """With the broker gone, closing a lost connection can stop half way: the transport has lost its
    client, the channel its pool, and Celery's hub then runs the acks still queued. kombu's ack raised
    AttributeError there and the worker exited (CI, a broker restarted without persistence)."""
    queue = broker.queue()
    broker.publish(queue, {"n": 1})
    connection = broker.connect()
    channel = channel_of(connection)
    channel.basic_qos(0, 1, False)
    inbox = Inbox(connection, [queue])
    message = inbox.next()
    transport = channel.connection

    channel._disconnect_pools()
    transport.client = None  # what kombu's Connection._do_close_transport leaves
    try:
        message.ack()  # no exception reaches the caller
    finally:
        transport.client = connection

    # Redis was not touched: the message is still in flight, for the reaper to give back.
    assert message.delivery_tag.encode() in broker.redis.smembers(channel.inflight_key)
    assert channel.qos.can_consume()  # its prefetch slot is free
    # kombu's unacked hash is shared by every queue: a record left there is counted by later tests
    # (monitoring's unacked_all_queues), and this test's own reaper is not running to remove it.
    broker.redis.hdel(channel.unacked_key, message.delivery_tag)
    broker.redis.zrem(channel.unacked_index_key, message.delivery_tag)


def test_a_channel_keeps_one_publishing_client_over_its_pool_and_a_new_one_for_a_new_pool(
    broker: Broker,
) -> None:
    connection = broker.connect()
    channel = channel_of(connection)
    queue = broker.queue()
    producer = Producer(connection)

    first = channel._create_client()
    for n in range(3):
        producer.publish({"n": n}, exchange=broker.exchange, routing_key=queue.routing_key, declare=[queue])
    assert channel._create_client() is first
    assert first.connection_pool is channel.pool
    assert broker.redis.llen(queue.name) == 3

    channel._disconnect_pools()  # what kombu does after a connection error
    second = channel._create_client()
    assert second is not first and second.connection_pool is channel.pool
    producer.publish({"n": 3}, exchange=broker.exchange, routing_key=queue.routing_key, declare=[queue])
    assert broker.redis.llen(queue.name) == 4


def test_a_no_ack_consumer_leaves_nothing_in_flight_and_starts_no_heartbeat_thread(broker: Broker) -> None:
    queue = broker.queue()
    broker.publish(queue, {"n": 1})
    connection = broker.connect()
    inbox = Inbox(connection, [queue], no_ack=True)

    assert inbox.next().payload == {"n": 1}
    assert broker.inflight(connection) == set()
    assert channel_of(connection)._pulse is None


def test_basic_get_fetches_atomically_too(broker: Broker) -> None:
    queue = broker.queue()
    broker.publish(queue, {"n": 1})
    connection = broker.connect()
    channel = channel_of(connection)
    queue(channel).declare()

    message = channel.basic_get(queue.name)

    assert broker.inflight(connection) == {message.delivery_tag.encode()}
    message.ack()
    assert broker.inflight(connection) == set()
    assert channel.basic_get(queue.name) is None


def test_a_fetch_can_take_a_batch_in_one_round_trip(broker: Broker) -> None:
    queue = broker.queue()
    for n in range(5):
        broker.publish(queue, {"n": n})
    connection = broker.connect(fetch_batch_size=3)
    inbox = Inbox(connection, [queue])
    inbox.consumer.qos(prefetch_count=3)

    connection.drain_events(timeout=5)  # one fetch, one reply

    assert [message.payload["n"] for message in inbox.messages] == [0, 1, 2]
    assert len(broker.inflight(connection)) == 3
    assert broker.redis.llen(queue.name) == 2


class LoopInbox:
    """A kombu consumer driven by kombu's event loop (a Hub), as a Celery worker drives it; each
    message is acked in its callback, as a worker acks after the task ran."""

    def __init__(self, connection: Connection, queues: list[Queue], prefetch: int) -> None:
        from kombu.asynchronous import Hub

        self.connection = connection
        self.acked: list[Any] = []
        connection.ensure_connection()
        self.consumer = Consumer(connection, queues, callbacks=[self._on_message], accept=["json"])
        self.consumer.qos(prefetch_count=prefetch)
        self.consumer.consume()
        self.hub = Hub()
        connection.transport.register_with_event_loop(connection.connection, self.hub)
        self.loop = self.hub.create_loop()

    def _on_message(self, body: Any, message: Any) -> None:
        message.ack()
        self.acked.append(message)

    def run_until(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < count:
            assert time.monotonic() < deadline, f"{len(self.acked)} of {count} messages within {timeout} s"
            next(self.loop)

    def close(self) -> None:
        self.hub.close()


class CommandLog(threading.Thread):
    """The commands clients send to the test's Redis database, seen with MONITOR (not those run
    inside scripts), between two marker commands: MONITOR's own order, no clock involved."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.db = self.client.connection_pool.connection_kwargs.get("db", 0)
        self.marker = f"command-log-{uuid.uuid4().hex}"
        self.seen: list[str] = []
        self.commands: list[str] = []
        self._listening = threading.Event()
        self._ended = threading.Event()

    def run(self) -> None:
        with self.client.monitor() as monitor:
            self._listening.set()
            for entry in monitor.listen():
                if entry.get("client_type") == "lua" or int(entry.get("db", -1)) != self.db:
                    continue
                self.seen.append(str(entry["command"]))
                if self.seen[-1] == f"GET {self.marker}-end":
                    self._ended.set()
                    return

    def __enter__(self) -> CommandLog:
        self.start()
        assert self._listening.wait(5)
        self.client.get(f"{self.marker}-start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.get(f"{self.marker}-end")
        assert self._ended.wait(10), "MONITOR did not see the end marker"
        between = self.seen[self.seen.index(f"GET {self.marker}-start") + 1 : -1]
        self.commands = [command.split(" ", 1)[0].upper() for command in between]


def test_under_an_event_loop_acks_ride_on_the_next_fetch_a_bounded_number_of_commands_per_message(
    broker: Broker,
) -> None:
    """Counted, not timed: stock kombu sends BRPOP, then MULTI HSET ZADD EXEC to record a message and
    MULTI ZREM HDEL EXEC to ack it (about 10 commands a message); here a fetch takes a batch and carries
    the last batch's acks, so the commands per message stay under one."""
    queue = broker.queue()
    for n in range(60):
        broker.publish(queue, {"n": n})
    # A heartbeat far apart, so the heartbeat thread sends nothing while the commands are counted.
    connection = broker.connect(
        fetch_batch_size=10, consumer_heartbeat_interval=30, consumer_heartbeat_lapse=61
    )
    inbox = LoopInbox(connection, [queue], prefetch=10)
    inbox.run_until(1)
    time.sleep(0.3)  # the heartbeat thread's first beat and reaper run are over
    try:
        with CommandLog(broker.url) as log:
            inbox.run_until(60)
            next(inbox.loop)  # the turn after the last callback sends its acks
        channel = channel_of(connection)
        assert broker.inflight(connection) == set()  # every ack reached Redis
        assert not any(broker.redis.hexists(channel.unacked_key, m.delivery_tag) for m in inbox.acked)
        assert "MULTI" not in log.commands
        # Measured: 6 fetches (EVALSHA) for 59 messages, nothing else; one per message would be 59.
        assert len(log.commands) <= 59 * 0.3, log.commands
    finally:
        inbox.close()


def test_an_ack_not_yet_in_redis_when_its_consumer_is_killed_comes_back(
    broker: Broker, tmp_path: Path
) -> None:
    """The consumer acks (batched: not yet sent) and is SIGKILLed in the same turn of its event loop:
    the message is still in its in-flight set, and the reaper gives it back, marked redelivered (in
    a worker, the job's claim then keeps it from running twice)."""
    queue = broker.queue()
    broker.publish(queue, {"n": 1})
    script = tmp_path / "doomed_consumer.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal
            from kombu import Connection, Consumer, Exchange, Queue
            from kombu.asynchronous import Hub
            from delivery.redis import Transport

            exchange = Exchange({broker.name!r}, type="direct")
            queue = Queue({queue.name!r}, exchange, routing_key={queue.name!r})
            options = {{
                "delivery_keyprefix": {broker.name + ":"!r}, "priority_steps": list(range(10)),
                "consumer_heartbeat_interval": 0.2, "consumer_heartbeat_lapse": 1.0,
            }}
            connection = Connection({broker.url!r}, transport=Transport, transport_options=options)
            connection.ensure_connection()

            def on_message(body, message):
                message.ack()  # batched: sent with the next fetch, or at the end of this turn
                assert connection.default_channel._acks, "the ack was sent at once"
                print("acked", message.delivery_tag, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

            consumer = Consumer(connection, [queue], callbacks=[on_message], accept=["json"])
            consumer.qos(prefetch_count=1)
            consumer.consume()
            hub = Hub()
            connection.transport.register_with_event_loop(connection.connection, hub)
            loop = hub.create_loop()
            while True:
                next(loop)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    tag = done.stdout.split()[1]
    (inflight_key,) = broker.redis.keys(f"{broker.name}:inflight:*")  # the dead consumer's
    assert broker.redis.smembers(inflight_key) == {tag.encode()}

    survivor = broker.connect()
    message = Inbox(survivor, [queue]).next(timeout=10)  # lapse 1 s + reaper every 0.2 s

    assert message.payload == {"n": 1}
    assert message.headers[DELIVERY_COUNT_HEADER] == 2
    assert message.delivery_info["redelivered"] is True
    message.ack()


def test_without_an_event_loop_an_ack_is_sent_at_once(broker: Broker) -> None:
    """A plain kombu consumer (basic_get, drain_events) may ack and never poll again: no batching."""
    queue = broker.queue()
    broker.publish(queue, {"n": 1})
    connection = broker.connect()
    inbox = Inbox(connection, [queue])
    message = inbox.next()

    message.ack()

    assert broker.inflight(connection) == set()
    assert not channel_of(connection)._acks


def test_when_delivery_fails_the_rest_of_a_batch_goes_back_unchanged(broker: Broker) -> None:
    queue = broker.queue()
    for n in range(3):
        broker.publish(queue, {"n": n})
    connection = broker.connect(fetch_batch_size=3)

    def explode(body: Any, message: Any) -> None:
        raise RuntimeError("the consumer's callback failed")

    consumer = Consumer(connection, [queue], callbacks=[explode], accept=["json"])
    consumer.consume()
    with pytest.raises(RuntimeError):
        connection.drain_events(timeout=5)

    next_out = [json.loads(raw) for raw in reversed(broker.redis.lrange(queue.name, 0, -1))]
    assert [json.loads(base64.b64decode(message["body"])) for message in next_out] == [{"n": 1}, {"n": 2}]
    assert all(DELIVERY_COUNT_HEADER not in message["headers"] for message in next_out)
    assert len(broker.inflight(connection)) == 1  # the first was handed to the consumer; it stays in flight


# --- order: priorities (9 first, as RabbitMQ) and round robin, as kombu -------------------


def fetch_order(broker: Broker, queue: Queue, published: list[int | None]) -> list[int]:
    """Publishes one message per entry (its priority, None: none given); the order they come out."""
    for n, priority in enumerate(published):
        broker.publish(queue, {"n": n}, priority=priority)
    inbox = Inbox(broker.connect(), [queue])
    order = []
    for _ in published:
        message = inbox.next()
        order.append(message.payload["n"])
        message.ack()
    return order


def test_higher_priority_messages_are_fetched_first(broker: Broker) -> None:
    order = fetch_order(broker, broker.queue(), [0, 9, 3, 9])

    assert order == [1, 3, 2, 0]  # 9 first (kombu alone reads 0 first); FIFO within a priority


def test_a_message_without_a_priority_waits_behind_higher_ones_and_ahead_of_lower_ones(
    broker: Broker,
) -> None:
    # Stock kombu files a message without a priority as 0, which it reads first: 60 such messages
    # kept a priority-9 job waiting behind all of them.
    order = fetch_order(broker, broker.queue(), [None, 4, None, 0, 6, 5, 9, None])

    assert order == [6, 4, 0, 2, 5, 7, 1, 3]  # 9, 6, then none and 5 together in order, 4, 0


def test_a_message_without_a_priority_is_filed_under_the_default_priority(broker: Broker) -> None:
    queue = broker.queue()
    broker.publish(queue, {"n": 1}, priority=None)
    broker.publish(queue, {"n": 2}, priority=0)  # kombu would turn an explicit 0 into the default

    channel = channel_of(broker.connect())
    assert channel.default_priority == 5
    by_key = {
        key: [json.loads(raw)["properties"]["priority"] for raw in broker.redis.lrange(key, 0, -1)]
        for key in channel.fetch_order(queue.name)
    }
    assert {key: found for key, found in by_key.items() if found} == {
        channel._q_for_pri(queue.name, 5): [5],
        queue.name: [0],
    }


def test_a_restored_message_goes_back_to_its_own_priority(broker: Broker) -> None:
    queue = broker.queue()
    broker.publish(queue, {"n": "nine"}, priority=9)
    connection = broker.connect()
    inbox = Inbox(connection, [queue])
    first = inbox.next()
    assert first.payload == {"n": "nine"}
    broker.publish(queue, {"n": "none"}, priority=None)
    broker.publish(queue, {"n": "eight"}, priority=8)

    first.reject(requeue=True)  # as a worker's restore (shutdown, reaper, visibility timeout) does

    order = []
    for _ in range(3):
        message = inbox.next()
        order.append(message.payload["n"])
        message.ack()
    assert order == ["nine", "eight", "none"]


def test_queues_are_consumed_round_robin(broker: Broker) -> None:
    first, second = broker.queue("a"), broker.queue("b")
    for n in range(3):
        broker.publish(first, {"q": "a", "n": n})
        broker.publish(second, {"q": "b", "n": n})
    connection = broker.connect()
    inbox = Inbox(connection, [first, second])

    order = []
    for _ in range(6):
        message = inbox.next()
        order.append(message.payload["q"])
        message.ack()

    assert order in (["a", "b"] * 3, ["b", "a"] * 3)


# --- the blocking wait -----------------------------------------------------------------------


def test_an_idle_consumer_is_woken_by_a_publish_not_by_polling(broker: Broker) -> None:
    queue = broker.queue()
    connection = broker.connect(fetch_poll_interval=30)
    inbox = Inbox(connection, [queue])
    assert inbox.nothing(0.3)
    published_at: list[float] = []

    def publish_later() -> None:
        time.sleep(0.3)
        published_at.append(time.monotonic())
        broker.publish(queue, {"n": 1})

    threading.Thread(target=publish_later).start()
    message = inbox.next(timeout=5)

    assert time.monotonic() - published_at[0] < 0.5  # not the 30 s poll
    message.ack()


def test_without_client_tracking_an_idle_consumer_still_polls(broker: Broker) -> None:
    queue = broker.queue()
    connection = broker.connect(fetch_poll_interval=0.2)
    channel_of(connection)._doorbell_supported = False  # as on a server that refuses CLIENT TRACKING
    inbox = Inbox(connection, [queue])
    assert inbox.nothing(0.3)

    broker.publish(queue, {"n": 1})

    inbox.next(timeout=2).ack()


def test_a_consumer_keeps_delivering_after_the_server_forgets_its_scripts(tmp_path: Path) -> None:
    """SCRIPT FLUSH (or a failover to a replica without them): the next fetch loads the script again."""
    from localdev.embedded_broker import EmbeddedBroker, free_port

    private = EmbeddedBroker(free_port(), tmp_path / "broker", persist=False)  # SCRIPT FLUSH is global
    private.start()
    try:
        queue = Queue("flushed", Exchange("flushed"), routing_key="flushed")
        with Connection(private.url, transport=Transport) as connection:
            inbox = Inbox(connection, [queue])
            with Connection(private.url) as producer_connection:
                producer = Producer(producer_connection)
                producer.publish({"n": 1}, exchange=queue.exchange, routing_key="flushed", declare=[queue])
                inbox.next().ack()
                redis.Redis.from_url(private.url).script_flush()
                producer.publish({"n": 2}, exchange=queue.exchange, routing_key="flushed")

            assert inbox.next().payload == {"n": 2}
    finally:
        private.stop()


# --- heartbeat and reaper ------------------------------------------------------------------------


def _stop_heartbeat(connection: Connection) -> None:
    """The consumer 'dies' without closing: its heartbeat thread stops, its messages stay in flight."""
    channel = channel_of(connection)
    channel._pulse.stop()
    channel._closing = True  # its poller would beat through the fetch script otherwise
    connection._default_channel = None  # type: ignore[attr-defined]  # the test's release must not restore them


def test_the_reaper_returns_a_dead_consumers_messages_marked_redelivered(broker: Broker) -> None:
    queue = broker.queue()
    broker.publish(queue, {"n": 1})
    doomed = broker.connect()
    Inbox(doomed, [queue]).next()
    dead_channel = channel_of(doomed)
    _stop_heartbeat(doomed)

    survivor = broker.connect()
    inbox = Inbox(survivor, [queue])
    message = inbox.next(timeout=5)  # lapse 1 s + reaper every 0.2 s

    assert message.payload == {"n": 1}
    assert message.headers[DELIVERY_COUNT_HEADER] == 2
    assert message.delivery_info["redelivered"] is True
    assert broker.redis.smembers(dead_channel.inflight_key) == set()
    assert broker.redis.zscore(dead_channel.registry_key, dead_channel.consumer_id) is None
    message.ack()


def test_after_broker_trouble_no_consumer_in_the_process_reaps_for_a_lapse(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen or unreachable broker silences every heartbeat: wait until live consumers beat again."""
    queue = broker.queue()
    broker.publish(queue, {"n": 1})
    doomed = broker.connect()
    Inbox(doomed, [queue]).next()
    _stop_heartbeat(doomed)
    monkeypatch.setattr(delivery_redis, "_broker_trouble_at", time.monotonic())

    survivor = broker.connect(consumer_heartbeat_lapse=3.0)
    inbox = Inbox(survivor, [queue])

    assert inbox.nothing(2)  # the dead heartbeat lapsed after 1 s, but this process had trouble
    assert inbox.next(timeout=3).payload == {"n": 1}


def test_a_live_consumers_messages_are_never_returned_however_long_it_holds_them(broker: Broker) -> None:
    queue = broker.queue()
    broker.publish(queue, {"n": 1})
    owner = broker.connect()
    held = Inbox(owner, [queue]).next()
    other = broker.connect()
    inbox = Inbox(other, [queue])

    assert inbox.nothing(4)  # four lapses, twenty reaper runs

    assert broker.inflight(owner) == {held.delivery_tag.encode()}
    held.ack()


def test_the_reaper_quarantines_undecodable_messages_a_dead_consumer_held(broker: Broker) -> None:
    queue = broker.queue()
    doomed = broker.connect()
    channel = channel_of(doomed)
    broker.lpush(queue, b"not json")
    # The fetch script holds the bad item; the consumer dies before it can quarantine it.
    reply = channel._fetch_script(
        channel._fetch_keys([queue.name]), channel._fetch_args(1), client=channel._create_client()
    )
    assert reply[3] == b"not JSON"
    assert broker.redis.hlen(channel.held_key) == 1

    survivor = broker.connect()
    Inbox(survivor, [queue])  # an acknowledging consumer: it beats and reaps from the start

    wait_for(broker.quarantined, timeout=5, what="the held message to be quarantined")
    assert broker.quarantined()[0]["body"] == "not json"
    assert broker.redis.hlen(channel.held_key) == 0


# --- quarantine ---------------------------------------------------------------------------------

UNDECODABLE = {
    "not JSON": (b"this is {not json", "not JSON"),
    "not UTF-8": (b"\xff\xfe{bad", "not JSON"),
    "a JSON string": (b'"just a string"', "not a kombu message"),
    "a JSON array": (b"[1, 2]", "not a kombu message"),
    "exchange not a string": (
        b'{"properties": {"delivery_tag": "t", "delivery_info": {"exchange": 1}}}',
        "not a kombu message",
    ),
    "no properties": (b'{"body": "x", "headers": {}}', "not a kombu message"),
    "body not base64": (None, "cannot decode the envelope or body"),
}


def _envelope_with_bad_base64(queue: Queue) -> bytes:
    return json.dumps(
        {
            "body": "%%% not base64 at all !",
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {},
            "properties": {
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
                "delivery_info": {"exchange": queue.exchange.name, "routing_key": queue.routing_key},
                "priority": 0,
            },
        }
    ).encode()


@pytest.mark.parametrize("kind", list(UNDECODABLE))
def test_an_undecodable_message_is_quarantined_and_the_next_good_one_delivered(
    broker: Broker, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue = broker.queue()
    raw, reason = UNDECODABLE[kind]
    raw = raw if raw is not None else _envelope_with_bad_base64(queue)
    broker.publish(queue, {"n": 0})  # declares the queue
    broker.redis.delete(queue.name)
    broker.lpush(queue, raw)
    broker.publish(queue, {"n": 1})
    connection = broker.connect()
    inbox = Inbox(connection, [queue])

    message = inbox.next()

    assert message.payload == {"n": 1}
    message.ack()
    (entry,) = broker.quarantined()
    assert set(entry) == {"queue", "reason", "size", "body", "at"}
    assert entry["queue"] == queue.name
    assert entry["reason"].startswith(reason)
    assert entry["size"] == len(raw)
    assert entry["body"] == raw.decode("utf-8", errors="backslashreplace")
    assert abs(entry["at"] - time.time()) < 60
    assert broker.inflight(connection) == set()
    assert broker.redis.hlen(channel_of(connection).held_key) == 0
    warnings = [r for r in caplog.records if r.name == "delivery.redis" and "Quarantined" in r.getMessage()]
    assert len(warnings) == 1
    assert raw.decode("utf-8", errors="replace")[:8] not in warnings[0].getMessage()


def test_the_quarantine_keeps_bodies_and_entries_bounded(broker: Broker) -> None:
    queue = broker.queue()
    broker.redis.rpush(broker.quarantine_key, *["old"] * 9_999)
    huge = b"x" * 70_000
    broker.lpush(queue, huge)
    connection = broker.connect()
    channel = channel_of(connection)
    queue(channel).declare()

    assert channel.basic_get(queue.name) is None

    assert broker.redis.llen(broker.quarantine_key) == 10_000
    entry = json.loads(broker.redis.lindex(broker.quarantine_key, 0) or b"")
    assert entry["size"] == 70_000
    assert len(entry["body"]) == 65_536


def test_the_quarantine_contract_is_the_documented_key() -> None:
    assert QUARANTINE_KEY == "jobs:quarantine:raw"
    entry = json.loads(delivery_redis.quarantine_entry("default", b"\xffabc", "not JSON", at=1.5))
    assert entry == {"queue": "default", "reason": "not JSON", "size": 4, "body": "\\xffabc", "at": 1.5}


def test_overlapping_queue_names_become_one_tracking_prefix() -> None:
    assert delivery_redis.tracking_prefixes(["email_bulk", "email", "images"]) == ["email", "images"]


# --- real workers ------------------------------------------------------------------------------


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_sigkilled_workers_task_runs_again_on_another_worker_within_30_s(
    empty_queues: None, worker_process: Callable[..., Any], tmp_path: Path
) -> None:
    doomed = worker_process("doomed", "-Q", "default", "-I", "tests.probes", "--pool=prefork", "-c", "1")
    marker = tmp_path / "runs.txt"

    probes.probe_delivery.delay(path=str(marker), seconds=120)
    wait_for(lambda: _lines(marker), timeout=30, what="the first run to start")
    for pid in [doomed.process.pid, *descendants(doomed.process.pid)]:
        os.kill(pid, signal.SIGKILL)  # the whole worker, main process and pool, at once
    killed_at = time.monotonic()
    doomed.process.wait()

    worker_process("rescuer", "-Q", "default", "-I", "tests.probes", "--pool=prefork", "-c", "1")
    wait_for(lambda: len(_lines(marker)) >= 2, timeout=40, what="the task to run again")

    back_after = time.monotonic() - killed_at
    assert back_after < 30, f"the task ran again {back_after:.1f} s after the kill"
    first, second = (json.loads(line) for line in _lines(marker))
    assert first["delivery_count"] is None and not first["redelivered"]
    assert second["delivery_count"] == 2 and second["redelivered"]


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_undecodable_messages_do_not_kill_a_worker_and_are_quarantined(
    empty_queues: None, worker_process: Callable[..., Any], tmp_path: Path
) -> None:
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    before = client.llen(QUARANTINE_KEY)
    worker = worker_process("survivor", "-Q", "default", "-I", "tests.probes", "--pool=solo")
    client.lpush("default", "this is {not json")
    bad_base64 = json.loads(_envelope_with_bad_base64(Queue("default", Exchange("default"), "default")))
    client.lpush("default", json.dumps(bad_base64))
    marker = tmp_path / "runs.txt"

    probes.probe_delivery.delay(path=str(marker), seconds=0)

    wait_for(lambda: _lines(marker), timeout=30, what="the good task to run")
    assert worker.process.poll() is None
    new_entries = client.lrange(QUARANTINE_KEY, 0, client.llen(QUARANTINE_KEY) - before - 1)
    entries = [json.loads(raw) for raw in new_entries]
    assert {entry["body"][:17] for entry in entries} >= {"this is {not json"}
    assert any(entry["reason"].startswith("cannot decode") for entry in entries)
    assert all(entry["queue"] == "default" for entry in entries)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_task_cut_off_by_a_broker_restart_runs_again_within_30_s(
    celery_app: Any, worker_process: Callable[..., Any], tmp_path: Path
) -> None:
    """The old connection's messages cannot be restored while the broker is down: the reaper returns them."""
    from localdev.embedded_broker import EmbeddedBroker, free_port

    private = EmbeddedBroker(free_port(), tmp_path / "broker", persist=True)  # a broker we may restart
    private.start()
    try:
        worker_process(
            "restarted",
            "-Q",
            "default",
            "-I",
            "tests.probes",
            "--pool=prefork",
            "-c",
            "1",
            broker_url=private.url,
        )
        marker = tmp_path / "runs.txt"
        with celery_app.connection_for_write(private.url) as connection:
            celery_app.send_task(
                "default.probe_delivery", kwargs={"path": str(marker), "seconds": 120}, connection=connection
            )
        wait_for(lambda: _lines(marker), timeout=30, what="the first run to start")

        private.stop()
        time.sleep(2)
        private.start()
        restarted_at = time.monotonic()
        wait_for(lambda: len(_lines(marker)) >= 2, timeout=45, what="the task to run again")

        back_after = time.monotonic() - restarted_at
        assert back_after < 30, f"the task ran again {back_after:.1f} s after the restart"
        assert json.loads(_lines(marker)[1])["redelivered"]
    finally:
        private.stop()
