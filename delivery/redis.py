"""kombu's Redis transport with reliable fetch: nothing is lost when a worker dies, and it comes back fast.

Stock kombu BRPOPs a message, then records it in the ``unacked`` hash with a
second write: a worker killed in between loses the message, and a dead
worker's messages only come back after the visibility timeout (hours). This
transport changes how a consumer *takes* messages, and the order of priorities;
publishing is kombu's otherwise.

- **Atomic fetch.** One Lua script (``FETCH``) pops the next message (highest
  priority step first, then the fair round-robin over queues), and records it
  in ``unacked``/``unacked_index`` (so kombu's ack, reject and restore work
  unchanged) and in this consumer's in-flight set, in one step. It takes a
  count: a later change can fetch a batch per round trip (``fetch_batch_size``).
- **Blocking wait without popping.** A Lua script cannot block, so when the
  queues are empty the consumer waits on a doorbell: a RESP2 connection with
  ``CLIENT TRACKING ... BCAST PREFIX <queue>`` redirected to itself and
  subscribed to ``__redis__:invalidate``, which Redis (>= 6) writes to the
  moment any client pushes to a queue key. No server configuration is needed.
  A fetch also runs every ``fetch_poll_interval`` seconds whatever happens, so a
  server without tracking still delivers (with that latency).
- **Acks ride on the next fetch.** Under an event loop (a Celery worker), an ack (or a reject
  without requeue) frees its prefetch slot at once and is sent to Redis with the next fetch, in
  the same script call, or at the end of the event loop's turn, one pipeline for all the acks
  of that turn (``ack_batching``). An ack not yet in Redis when the worker dies leaves its
  message in the in-flight set: the reaper gives it back and the job's claim stops a second run.
  Without an event loop (a plain kombu consumer, ``basic_get``) acks are sent at once.
- **Heartbeat and reaper.** Each consuming channel has an id, a heartbeat key
  with a TTL (``consumer_heartbeat_lapse``) refreshed every
  ``consumer_heartbeat_interval`` seconds by a daemon thread (so a task that
  blocks the event loop, as on the solo pool, does not stop it; a killed process
  stops it at once), and a registry entry. The same thread reaps, under a short
  lock: every consumer whose heartbeat lapsed gets its in-flight messages pushed
  back to the head of their queues, marked redelivered. kombu's visibility
  timeout stays as the last resort.
- **Delivery count.** Every restore (reaper, visibility timeout, reject with
  requeue, shutdown) sets ``headers["x_delivery_count"]`` to one more than
  before; a message without the header is on its first delivery (count 1).
- **Priorities run 9 first, as on RabbitMQ.** kombu keeps one list per priority
  step and files a message under its own number, as here, but reads step 0
  first (so on stock kombu 0 is the highest priority and a message sent without
  one, filed as 0, overtakes everything). This transport reads the highest step
  first, keeps an explicit 0 (kombu turns ``priority=0`` into the default), and
  files a message without a priority under ``default_priority`` (a transport
  option; the project sets 5, the middle of 0-9).
- **Quarantine.** A message that is not JSON or not a kombu envelope (or whose
  body cannot be decoded) never reaches the worker: it leaves in-flight and is
  pushed to ``jobs:quarantine:raw`` (see ``quarantine_entry``), one warning is
  logged without the body, and the channel goes on.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator
from queue import Empty
from typing import Any

import redis as redis_py
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

# A transport subclass lives on kombu's private attributes, which the kombu stubs (celery-types)
# do not declare: the two modules are typed as Any rather than sprinkled with ignores.
kombu_redis: Any = importlib.import_module("kombu.transport.redis")
virtual: Any = importlib.import_module("kombu.transport.virtual")
kombu_transports: Any = importlib.import_module("kombu.transport")

logger = logging.getLogger(__name__)

#: The header that counts deliveries; absent means the first delivery.
DELIVERY_COUNT_HEADER = "x_delivery_count"
QUARANTINE_KEY = "jobs:quarantine:raw"
QUARANTINE_MAX_ENTRIES = 10_000
QUARANTINE_BODY_CHARS = 65_536
#: Acks sent in one round trip at most (Lua's unpack has a limit of a few thousand values).
ACKS_PER_ROUND_TRIP = 1000
#: The channel Redis sends tracking invalidations to (RESP2 with REDIRECT).
INVALIDATE_CHANNEL = "__redis__:invalidate"

#: First settles the ARGV[5] acks ARGV[6..] (tags removed from KEYS[1], KEYS[2], KEYS[3]). Then
#: pops up to ARGV[1] messages from the queue keys KEYS[7..] (first non-empty
#: key first, as BRPOP would) and records each as in flight in the same step:
#: kombu's unacked hash KEYS[1] (tag -> [message, exchange, routing_key]) and
#: index KEYS[2] (tag -> ARGV[2], the time), this consumer's set KEYS[3]. A
#: popped item that is not a kombu envelope goes to this consumer's hold hash
#: KEYS[4] instead (to be quarantined). Also refreshes the heartbeat KEYS[5]
#: (ARGV[4] ms) and the registry KEYS[6]: a consumer that fetches is alive.
#: Returns {key, item, tag or hold field, reason or ""} per message.
FETCH = """
local acks = tonumber(ARGV[5] or '0')
if acks > 0 then
  local tags = {unpack(ARGV, 6, 5 + acks)}
  redis.call('ZREM', KEYS[2], unpack(tags))
  redis.call('HDEL', KEYS[1], unpack(tags))
  redis.call('SREM', KEYS[3], unpack(tags))
end
local count = tonumber(ARGV[1])
local out = {}
local taken = 0
redis.call('SET', KEYS[5], ARGV[3], 'PX', ARGV[4])
redis.call('ZADD', KEYS[6], ARGV[2], ARGV[3])
for i = 7, #KEYS do
  while taken < count do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    taken = taken + 1
    local reason = ''
    local tag = nil
    local ok, msg = pcall(cjson.decode, item)
    if not ok then
      reason = 'not JSON'
    elseif type(msg) ~= 'table' then
      reason = 'not a kombu message: not a JSON object'
    elseif type(msg.properties) ~= 'table' or type(msg.properties.delivery_tag) ~= 'string'
        or type(msg.properties.delivery_info) ~= 'table' then
      reason = 'not a kombu message: no properties.delivery_tag or delivery_info'
    else
      local info = msg.properties.delivery_info
      local exchange, routing_key = info.exchange, info.routing_key
      if exchange == nil or exchange == cjson.null then exchange = '' end
      if routing_key == nil or routing_key == cjson.null then routing_key = '' end
      if type(exchange) ~= 'string' or type(routing_key) ~= 'string' then
        reason = 'not a kombu message: exchange or routing_key is not a string'
      else
        tag = msg.properties.delivery_tag
        local record = '[' .. item .. ',' .. cjson.encode(exchange) .. ',' .. cjson.encode(routing_key) .. ']'
        redis.call('HSET', KEYS[1], tag, record)
        redis.call('ZADD', KEYS[2], ARGV[2], tag)
        redis.call('SADD', KEYS[3], tag)
      end
    end
    if reason ~= '' then
      tag = ARGV[2] .. ':' .. taken .. '|' .. reason .. '|' .. KEYS[i]
      redis.call('HSET', KEYS[4], tag, item)
    end
    table.insert(out, KEYS[i])
    table.insert(out, item)
    table.insert(out, tag)
    table.insert(out, reason)
  end
  if taken >= count then break end
end
return out
"""

#: Pushes entry ARGV[1] onto the quarantine list KEYS[1] (keeping ARGV[4]
#: entries) and forgets the message: tag ARGV[2] from kombu's unacked hash
#: KEYS[2], its index KEYS[3] and the in-flight set KEYS[4], or field ARGV[3]
#: from the hold hash KEYS[5].
QUARANTINE = """
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[4]) - 1)
if ARGV[2] ~= '' then
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  redis.call('SREM', KEYS[4], ARGV[2])
end
if ARGV[3] ~= '' then
  redis.call('HDEL', KEYS[5], ARGV[3])
end
return 1
"""

# When this process last failed to reach the broker, or found it stalled
# (monotonic): no consumer in it reaps until a whole lapse has passed since, so
# an outage or a frozen broker that stopped everyone's heartbeats is not taken
# for deaths (every live consumer beats again within an interval of its end).
_broker_trouble_at: float | None = None


def _note_broker_trouble() -> None:
    global _broker_trouble_at
    _broker_trouble_at = time.monotonic()


def _may_reap(lapse: float) -> bool:
    trouble = _broker_trouble_at
    return trouble is None or time.monotonic() - trouble >= lapse


def delivery_count(payload: dict[str, Any]) -> int:
    """How many times a raw kombu message has been delivered, counting the one about to happen."""
    headers = payload.get("headers") or {}
    try:
        return max(1, int(headers.get(DELIVERY_COUNT_HEADER, 1)))
    except (TypeError, ValueError, AttributeError):
        return 1


def quarantine_entry(queue: str, raw: bytes, reason: str, at: float | None = None) -> str:
    """The JSON pushed to ``jobs:quarantine:raw``: what the Django side lists and drains."""
    return json.dumps(
        {
            "queue": queue,
            "reason": reason,
            "size": len(raw),
            "body": raw.decode("utf-8", errors="backslashreplace")[:QUARANTINE_BODY_CHARS],
            "at": time.time() if at is None else at,
        }
    )


def tracking_prefixes(queues: Iterable[str]) -> list[str]:
    """Queue names as CLIENT TRACKING prefixes: Redis refuses overlapping ones, the shorter covers both."""
    kept: list[str] = []
    for name in sorted(set(queues), key=len):
        if name and not any(name.startswith(prefix) for prefix in kept):
            kept.append(name)
    return kept


def _quads(reply: list[Any]) -> Iterator[tuple[bytes, bytes, str, str]]:
    for i in range(0, len(reply), 4):
        yield reply[i], reply[i + 1], bytes_to_str(reply[i + 2]), bytes_to_str(reply[i + 3])


class QoS(kombu_redis.QoS):
    """kombu's QoS; the fetch script already recorded what it hands out, and acks leave the in-flight set."""

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel._take_recorded(delivery_tag):
            self.channel._start_pulse()  # it holds a message now, whatever way it came
            virtual.QoS.append(self, message, delivery_tag)  # local bookkeeping only
        else:  # not from the fetch script (a fanout queue with acks): kombu's two writes
            super().append(message, delivery_tag)

    # An ack (or reject) the broker did not take, a frozen or restarting one, still frees the
    # message's prefetch slot: kombu's would keep it held for good (its local bookkeeping comes after
    # the Redis write that raised), and a worker whose every slot is held that way never fetches
    # again. What Redis did not get is done later (Channel._settle_pending), before the next fetch;
    # if this worker dies first, the message is restored from its in-flight set like any other,
    # and the job's claim keeps a second run from doing anything.

    def ack(self, delivery_tag: str) -> None:
        self._settle(delivery_tag, requeue=False)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self._settle(delivery_tag, requeue=requeue)

    def _settle(self, delivery_tag: str, *, requeue: bool) -> None:
        if self.channel.closed or self.channel.connection is None or self.channel.connection.client is None:
            # The channel closed first (a lost connection: Celery's hub runs the acks still queued
            # when it closes). Closing gave this channel's unacked messages back, or, if Redis was
            # gone, left them in its in-flight set for the reaper: the message is delivered again
            # and the job's claim keeps it from running twice. kombu's ack would raise
            # AttributeError here and kill the worker.
            logger.debug("consumer %s: an ack after its channel closed is dropped", self.channel.consumer_id)
            virtual.QoS.ack(self, delivery_tag)
            return
        if not requeue and self.channel.batching_acks():
            # Sent with the next fetch or at the end of this turn of the event loop (Channel.flush_acks).
            self.channel._acks.append(delivery_tag)
            virtual.QoS.ack(self, delivery_tag)
            return
        try:
            self.settle_in_redis(delivery_tag, requeue=requeue)
        except self.channel.connection_errors as exc:
            self.channel._settle_later(delivery_tag, requeue, exc)
        virtual.QoS.ack(self, delivery_tag)  # local bookkeeping: the prefetch slot is free

    def settle_in_redis(self, delivery_tag: str, *, requeue: bool) -> None:
        if requeue:
            self.restore_by_tag(delivery_tag, leftmost=True)
        else:
            self._remove_from_indices(delivery_tag).execute()

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        with self.pipe_or_acquire(pipe) as pipe:
            return (
                pipe.zrem(self.unacked_index_key, delivery_tag)
                .hdel(self.unacked_key, delivery_tag)
                .srem(self.channel.inflight_key, delivery_tag)
            )


class _Doorbell:
    """A RESP2 connection told by Redis whenever a key starting with one of `prefixes` changes."""

    def __init__(self, channel: Channel, prefixes: list[str]) -> None:
        params = channel._connparams()
        params.pop("max_connections", None)
        connection_class = params.pop("connection_class")
        self.prefixes = prefixes
        self.connection = connection_class(**params, protocol=2)
        conn = self.connection
        conn.connect()
        conn.send_command("CLIENT", "ID")
        client_id = conn.read_response()
        args: list[Any] = ["CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST"]
        for prefix in prefixes:
            args += ["PREFIX", prefix]
        conn.send_command(*args)
        conn.read_response()
        conn.send_command("SUBSCRIBE", INVALIDATE_CHANNEL)
        conn.read_response()

    def drain(self) -> None:
        while self.connection.can_read(timeout=0):
            self.connection.read_response()

    def close(self) -> None:
        self.connection.disconnect()


_UNREACHABLE = (redis_py.exceptions.ConnectionError, redis_py.exceptions.TimeoutError, OSError)


class _Pulse(threading.Thread):
    """Keeps a channel's heartbeat alive and reaps consumers whose heartbeat lapsed."""

    def __init__(self, channel: Channel) -> None:
        super().__init__(name=f"delivery-heartbeat-{channel.consumer_id}", daemon=True)
        self._channel = weakref.ref(channel)
        self._stopping = threading.Event()
        self.interval = channel.consumer_heartbeat_interval
        params = channel._connparams()
        # A frozen broker must show up as an error here, not as a thread blocked forever.
        params["socket_timeout"] = params["socket_connect_timeout"] = max(1.0, self.interval)
        self.client = channel.Client(connection_pool=redis_py.ConnectionPool(**params))

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout=5)
        self.client.connection_pool.disconnect()

    def run(self) -> None:
        failing = False
        while not self._stopping.is_set():
            channel = self._channel()
            if channel is None or channel._closing:
                return
            try:
                started = time.monotonic()
                channel._beat(self.client)
                if time.monotonic() - started > self.interval:
                    _note_broker_trouble()  # the broker stalled: other heartbeats may be late too
                if _may_reap(channel.consumer_heartbeat_lapse):
                    channel._reap(self.client)
                if failing:
                    logger.info("consumer %s: heartbeat reaches the broker again", channel.consumer_id)
                failing = False
            except _UNREACHABLE:
                _note_broker_trouble()
                if not failing:  # one line per outage, not one per beat
                    logger.warning(
                        "consumer %s: heartbeat or reaper cannot reach the broker; retrying every %s s",
                        channel.consumer_id,
                        self.interval,
                        exc_info=True,
                    )
                failing = True
            except Exception:  # a bug, not an outage: say so, and keep the heartbeat going
                logger.exception("consumer %s: heartbeat or reaper failed", channel.consumer_id)
            del channel
            self._stopping.wait(self.interval)


class Channel(kombu_redis.Channel):
    """A Redis channel whose consumers fetch atomically, beat, reap and quarantine (see the module doc)."""

    QoS = QoS

    #: Seconds between heartbeats (and reaper runs) of a consuming channel.
    consumer_heartbeat_interval: float = 5
    #: A consumer whose heartbeat is this many seconds old is dead: its messages go back.
    consumer_heartbeat_lapse: float = 15
    #: Longest wait between two fetches of an idle consumer (the doorbell usually rings first).
    fetch_poll_interval: float = 1.0
    #: Messages taken per fetch at most (and never more than the prefetch limit allows).
    fetch_batch_size: int = 1
    #: Under an event loop, acks go with the next fetch or at the end of the loop's turn (module doc).
    ack_batching: bool = True
    #: Prefix of this transport's own keys: heartbeats, in-flight sets, registry, reaper lock.
    delivery_keyprefix: str = "delivery:"
    quarantine_key: str = QUARANTINE_KEY
    #: The priority of a message sent without one (kombu's is 0, the lowest here).
    default_priority: int = 5

    from_transport_options = (
        *kombu_redis.Channel.from_transport_options,
        "default_priority",
        "consumer_heartbeat_interval",
        "consumer_heartbeat_lapse",
        "fetch_poll_interval",
        "fetch_batch_size",
        "ack_batching",
        "delivery_keyprefix",
        "quarantine_key",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.global_keyprefix:
            raise ValueError(
                "delivery.redis does not support kombu's global_keyprefix: remove it from "
                "broker_transport_options or use a Redis database of your own instead"
            )
        if self.consumer_heartbeat_lapse <= self.consumer_heartbeat_interval:
            raise ValueError(
                f"consumer_heartbeat_lapse ({self.consumer_heartbeat_lapse} s) must be longer than "
                f"consumer_heartbeat_interval ({self.consumer_heartbeat_interval} s)"
            )
        self.consumer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.inflight_key = self.inflight_key_for(self.consumer_id)
        self.held_key = self.held_key_for(self.consumer_id)
        self.heartbeat_key = self.heartbeat_key_for(self.consumer_id)
        self.registry_key = f"{self.delivery_keyprefix}consumers"
        self.reaper_lock_key = f"{self.delivery_keyprefix}reaper"
        self._fetch_script = self.client.register_script(FETCH)
        self._quarantine_script = self.client.register_script(QUARANTINE)
        self._recorded: set[str] = set()
        # Delivery tag -> requeue, for acks and rejects the broker did not take (QoS._settle).
        self._pending_settles: dict[str, bool] = {}
        # Acks not yet sent (QoS._settle, under an event loop), and those sent with the fetch whose
        # reply is not read yet. A deque: a thread pool's acks may come from other threads.
        self._acks: collections.deque[str] = collections.deque()
        self._acks_in_fetch: list[str] = []
        self._pulse: _Pulse | None = None
        self._doorbell: _Doorbell | None = None
        self._doorbell_supported = True
        self._doorbell_retry_at = 0.0
        self._rung = True
        self._idle_since: float | None = None
        self._fetch_script_loaded = False

    # --- keys ---------------------------------------------------------------------

    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        """kombu builds a new redis client for every publish, queue size or purge (over the channel's
        one connection pool): building one is about 0.2 ms of Python (its table of response
        callbacks), a sixth of an `apply_async`. One is kept per channel and pool instead; the pool
        is shared as before, and a pool kombu replaced (after a connection error) gets a new one."""
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self._sync_client
        if client is None or client.connection_pool is not pool:
            client = self._sync_client = super()._create_client()
        return client

    def inflight_key_for(self, consumer_id: str) -> str:
        return f"{self.delivery_keyprefix}inflight:{consumer_id}"

    def held_key_for(self, consumer_id: str) -> str:
        return f"{self.delivery_keyprefix}held:{consumer_id}"

    def heartbeat_key_for(self, consumer_id: str) -> str:
        return f"{self.delivery_keyprefix}heartbeat:{consumer_id}"

    def _fetch_keys(self, queue_keys: list[str]) -> list[str]:
        return [
            self.unacked_key,
            self.unacked_index_key,
            self.inflight_key,
            self.held_key,
            self.heartbeat_key,
            self.registry_key,
            *queue_keys,
        ]

    def _fetch_args(self, count: int) -> list[Any]:
        lapse_ms = int(self.consumer_heartbeat_lapse * 1000)
        return [count, repr(time.time()), self.consumer_id, lapse_ms]

    def fetch_order(self, queue: str) -> list[str]:
        """`queue`'s priority lists, in the order they are read: the highest priority first."""
        return [self._q_for_pri(queue, pri) for pri in sorted(self.priority_steps, reverse=True)]

    # --- priorities: 9 first, as RabbitMQ; none is default_priority ----------------

    def prepare_message(
        self,
        body: Any,
        priority: int | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        headers: dict[str, Any] | None = None,
        properties: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        # kombu writes `priority or default_priority`: an explicit 0 would become the default.
        properties = dict(properties or {})
        properties.setdefault("priority", self.default_priority if priority is None else priority)
        return super().prepare_message(body, priority, content_type, content_encoding, headers, properties)

    def _fetch_count(self) -> int:
        room = self.qos.can_consume_max_estimate()
        return max(1, min(self.fetch_batch_size, room)) if room is not None else self.fetch_batch_size

    # --- the fetch, on kombu's BRPOP connection and poller -------------------------

    def _fetch_due(self) -> bool:
        if self._rung or self._idle_since is None:
            return True
        return time.monotonic() - self._idle_since >= self.fetch_poll_interval

    def seconds_to_next_fetch(self) -> float | None:
        """How long an idle consumer may sleep before it must fetch again (None: not idle)."""
        if self._in_poll or not self.active_queues or self._rung or self._idle_since is None:
            return None
        return max(0.0, self.fetch_poll_interval - (time.monotonic() - self._idle_since))

    def _settle_later(self, delivery_tag: str, requeue: bool, exc: BaseException) -> None:
        if not self._pending_settles:
            logger.warning(
                "consumer %s: the broker did not take an acknowledgement (%s); it is sent again "
                "before the next fetch",
                self.consumer_id,
                type(exc).__name__,
            )
        self._pending_settles[delivery_tag] = requeue

    def _settle_pending(self) -> bool:
        """Sends the acks and rejects the broker did not take; False while it still does not."""
        for tag, requeue in list(self._pending_settles.items()):
            try:
                self.qos.settle_in_redis(tag, requeue=requeue)
            except self.connection_errors:
                return False
            del self._pending_settles[tag]
        return True

    # --- acks in batches (under an event loop) ------------------------------------------

    def batching_acks(self) -> bool:
        return self.ack_batching and getattr(self.connection, "event_loop_registered", False)

    def _take_acks(self) -> list[str]:
        taken: list[str] = []
        with contextlib.suppress(IndexError):
            while len(taken) < ACKS_PER_ROUND_TRIP:
                taken.append(self._acks.popleft())
        return taken

    def _acks_unconfirmed(self, tags: list[str], exc: BaseException) -> None:
        """Acks that may not have reached Redis: sent again before the next fetch (idempotent)."""
        for tag in tags:
            self._settle_later(tag, False, exc)

    def flush_acks(self) -> None:
        """Sends the acks no fetch took along: one round trip for all of them (the end of a loop turn)."""
        while self._acks:
            tags = self._take_acks()
            try:
                with self.conn_or_acquire() as client:
                    pipe = client.pipeline(transaction=False)
                    pipe.zrem(self.unacked_index_key, *tags)
                    pipe.hdel(self.unacked_key, *tags)
                    pipe.srem(self.inflight_key, *tags)
                    pipe.execute()
            except self.connection_errors as exc:
                self._acks_unconfirmed(tags, exc)
                return

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues or not self._fetch_due():
            return
        if self._acks_in_fetch:  # the last fetch's reply was never read (a lost connection)
            self._acks_unconfirmed(self._acks_in_fetch, ConnectionError("fetch reply not read"))
            self._acks_in_fetch = []
        if self._pending_settles:
            self._settle_pending()  # if the broker still does not answer, neither will the fetch
        if not self._fetch_script_loaded:
            with self.conn_or_acquire() as client:
                client.script_load(FETCH)
            self._fetch_script_loaded = True
        # Priority-major, as kombu: every queue's highest step, then every queue's next one, ...
        queue_keys = [key for keys in zip(*map(self.fetch_order, queues), strict=True) for key in keys]
        keys = self._fetch_keys(queue_keys)
        self._rung = False
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()
        acks = self._acks_in_fetch = self._take_acks()  # they ride on this fetch
        connection.send_command(
            "EVALSHA",
            self._fetch_script.sha,
            len(keys),
            *keys,
            *self._fetch_args(self._fetch_count()),
            len(acks),
            *acks,
        )

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "EVALSHA", **options)
            except redis_py.exceptions.NoScriptError:
                # The server lost its script cache (SCRIPT FLUSH): load it and fetch again.
                self._acks.extendleft(reversed(self._acks_in_fetch))  # the script did not run
                self._acks_in_fetch = []
                self._fetch_script_loaded = False
                self._rung = True
                raise Empty() from None
            except self.connection_errors as exc:
                self._acks_unconfirmed(self._acks_in_fetch, exc)
                self._acks_in_fetch = []
                _note_broker_trouble()
                self.client.connection.disconnect()
                raise
            self._acks_in_fetch = []  # the script ran: they are settled
            if not reply:
                self._idle_since = time.monotonic()
                raise Empty()
            self._idle_since = None
            if not self._handle_fetched(reply):
                self._rung = True  # all quarantined: there may be more behind them
                raise Empty()
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _handle_fetched(self, reply: list[Any]) -> int:
        """Delivers what the fetch script took; quarantines what cannot be a message. How many delivered."""
        delivered = 0
        items = list(_quads(reply))
        for index, (key, item, tag, reason) in enumerate(items):
            queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            if reason:
                self._quarantine(queue, item, reason, held_field=tag)
                continue
            payload, problem = self._decode(item)
            if payload is None:
                self._quarantine(queue, item, problem, tag=tag)
                continue
            if self._closing:
                self._give_back(key, item, tag)
                continue
            self._recorded.add(tag)
            try:
                self.connection._deliver(payload, queue)
            except BaseException:
                self._forget_unappended(tag)
                # Back to the head of their queues, the last first, so they come out in order again.
                for later_key, later_item, later_tag, later_reason in reversed(items[index + 1 :]):
                    if not later_reason:
                        self._give_back(later_key, later_item, later_tag)
                    else:
                        later_queue = bytes_to_str(later_key).rsplit(self.sep, 1)[0]
                        self._quarantine(later_queue, later_item, later_reason, held_field=later_tag)
                raise
            self._forget_unappended(tag)
            delivered += 1
        return delivered

    def _decode(self, item: bytes) -> tuple[dict[str, Any] | None, str]:
        """The message as kombu reads it, or None and why it cannot be one (never the body itself)."""
        try:
            payload = loads(bytes_to_str(item))
        except Exception as exc:
            return None, f"not JSON: {type(exc).__name__}"
        if not isinstance(payload, dict):
            return None, "not a kombu message: not a JSON object"
        properties = payload.get("properties")
        if not isinstance(properties, dict) or not isinstance(properties.get("delivery_info"), dict):
            return None, "not a kombu message: no properties.delivery_info"
        if not isinstance(payload.get("headers") or {}, dict):
            return None, "not a kombu message: headers is not an object"
        try:
            self.Message(payload, channel=self)  # what kombu does next: envelope fields, body decoding
        except Exception as exc:
            return None, f"cannot decode the envelope or body: {type(exc).__name__}: {str(exc)[:200]}"
        return payload, ""

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        no_ack = kwargs["no_ack"] if "no_ack" in kwargs else bool(args and args[0])
        if not no_ack:
            # A consumer that acknowledges beats and reaps from the start, even before its first
            # message: a worker started to replace a dead one must be able to give its jobs back.
            # A no_ack consumer (Celery's control replies) holds nothing, so it needs no thread.
            self._start_pulse()
        return super().basic_consume(queue, *args, **kwargs)

    def _take_recorded(self, delivery_tag: str) -> bool:
        try:
            self._recorded.remove(delivery_tag)
        except KeyError:
            return False
        return True

    def _forget_unappended(self, tag: str) -> None:
        """A message delivered to a no_ack consumer was never appended to QoS: it is done with."""
        if self._take_recorded(tag):
            with self.conn_or_acquire() as client:
                self.qos._remove_from_indices(tag, client.pipeline()).execute()

    def _give_back(self, key: bytes, item: bytes, tag: str) -> None:
        """Returns a fetched but undelivered message to the head of its queue, unchanged."""
        with self.conn_or_acquire() as client:
            pipe = client.pipeline()
            self.qos._remove_from_indices(tag, pipe)
            pipe.rpush(key, item).execute()

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        """basic_get: the same atomic fetch, from one queue, without waiting."""
        queue_keys = self.fetch_order(queue)
        with self.conn_or_acquire() as client:
            while True:
                reply = self._fetch_script(self._fetch_keys(queue_keys), self._fetch_args(1), client=client)
                if not reply:
                    self._maybe_update_queues_expire(client, queue)
                    raise Empty()
                ((_key, item, tag, reason),) = _quads(reply)
                if reason:
                    self._quarantine(queue, item, reason, held_field=tag)
                    continue
                payload, problem = self._decode(item)
                if payload is None:
                    self._quarantine(queue, item, problem, tag=tag)
                    continue
                self._maybe_update_queues_expire(client, queue)
                self._recorded.add(tag)
                return payload

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None:
            self._forget_unappended(message.delivery_tag)
        return message

    # --- quarantine ----------------------------------------------------------------

    def _quarantine(
        self,
        queue: str,
        raw: bytes,
        reason: str,
        *,
        tag: str = "",
        held_field: str = "",
        consumer_id: str | None = None,
        client: Any = None,
    ) -> None:
        consumer_id = consumer_id or self.consumer_id
        keys = [
            self.quarantine_key,
            self.unacked_key,
            self.unacked_index_key,
            self.inflight_key_for(consumer_id),
            self.held_key_for(consumer_id),
        ]
        entry = quarantine_entry(queue, raw, reason)
        with self.conn_or_acquire(client) as conn:
            self._quarantine_script(keys, [entry, tag, held_field, QUARANTINE_MAX_ENTRIES], client=conn)
        logger.warning(
            "Quarantined an undecodable message from queue %r (%d bytes): %s; it is in the Redis list %s",
            queue,
            len(raw),
            reason,
            self.quarantine_key,
        )

    # --- restore: redelivered, counted, with a new delivery tag ---------------------

    def _do_restore_message(
        self, payload: Any, exchange: str, routing_key: str, pipe: Any, leftmost: bool = False
    ) -> None:
        try:
            headers = payload.get("headers")
            if not isinstance(headers, dict):
                headers = payload["headers"] = {}
            headers[DELIVERY_COUNT_HEADER] = delivery_count(payload) + 1
            # A fresh tag: a late ack of the earlier copy must not remove the new copy's record.
            payload["properties"]["delivery_tag"] = self._next_delivery_tag()
        except (AttributeError, KeyError, TypeError):
            pass
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)

    # --- heartbeat and reaper (run by _Pulse, in its own thread and connection) -----

    def _start_pulse(self) -> None:
        if self._pulse is None and not self._closing:
            self._pulse = _Pulse(self)
            self._pulse.start()

    def _beat(self, client: Any) -> None:
        lapse_ms = int(self.consumer_heartbeat_lapse * 1000)
        pipe = client.pipeline(transaction=False)
        pipe.set(self.heartbeat_key, self.consumer_id, px=lapse_ms)
        pipe.zadd(self.registry_key, {self.consumer_id: time.time()})
        pipe.execute()

    def _reap(self, client: Any) -> int:
        """Returns the in-flight messages of every consumer whose heartbeat lapsed; how many."""
        returned = 0
        try:
            with kombu_redis.Mutex(client, self.reaper_lock_key, max(1, int(self.consumer_heartbeat_lapse))):
                for raw_id in client.zrange(self.registry_key, 0, -1):
                    consumer_id = bytes_to_str(raw_id)
                    if consumer_id != self.consumer_id and not client.exists(
                        self.heartbeat_key_for(consumer_id)
                    ):
                        returned += self._reap_consumer(client, consumer_id)
        except kombu_redis.MutexHeld:
            pass
        return returned

    def _reap_consumer(self, client: Any, consumer_id: str) -> int:
        inflight_key = self.inflight_key_for(consumer_id)
        held_key = self.held_key_for(consumer_id)
        returned = 0
        for raw_tag in client.smembers(inflight_key):
            returned += self._restore_reaped(client, bytes_to_str(raw_tag), inflight_key)
        for raw_field, raw in client.hgetall(held_key).items():
            field = bytes_to_str(raw_field)
            _, reason, key = field.split("|", 2)
            self._quarantine(
                key.rsplit(self.sep, 1)[0],
                raw,
                reason,
                held_field=field,
                consumer_id=consumer_id,
                client=client,
            )
        if returned:
            logger.warning(
                "Returned %d in-flight message(s) of consumer %s to their queues: its heartbeat lapsed",
                returned,
                consumer_id,
            )
        pipe = client.pipeline()
        pipe.scard(inflight_key).hlen(held_key)
        left_inflight, left_held = pipe.execute()
        if not left_inflight and not left_held:
            client.zrem(self.registry_key, consumer_id)
        return returned

    def _restore_reaped(self, client: Any, tag: str, inflight_key: str) -> int:
        restored = []

        def transaction(pipe: Any) -> None:
            record = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            pipe.zrem(self.unacked_index_key, tag).hdel(self.unacked_key, tag).srem(inflight_key, tag)
            if record:
                message, exchange, routing_key = loads(bytes_to_str(record))
                self._do_restore_message(message, exchange, routing_key, pipe, leftmost=False)
                restored.append(tag)

        client.transaction(transaction, self.unacked_key)
        return len(restored)

    # --- the doorbell ---------------------------------------------------------------

    def ensure_doorbell(self, cycle: kombu_redis.MultiChannelPoller) -> None:
        """Keeps a doorbell subscribed to the queues this channel consumes (called every poll tick)."""
        queues = self.active_queues
        if not queues or not self._doorbell_supported:
            self._drop_doorbell(cycle)
            return
        prefixes = tracking_prefixes(queues)
        if self._doorbell is not None and self._doorbell.prefixes == prefixes:
            return
        self._drop_doorbell(cycle)
        if time.monotonic() < self._doorbell_retry_at:
            return
        try:
            doorbell = _Doorbell(self, prefixes)
        except self.ResponseError as exc:
            self._doorbell_supported = False
            logger.warning(
                "The broker refused CLIENT TRACKING (%s): idle consumers will poll every %s s instead",
                exc,
                self.fetch_poll_interval,
            )
            return
        except self.connection_errors:
            self._doorbell_retry_at = time.monotonic() + self.fetch_poll_interval
            logger.debug("doorbell: cannot connect; retrying", exc_info=True)
            return
        self._doorbell = doorbell
        cycle._register(self, doorbell, "WAKE")
        self._rung = True  # anything pushed before it listened

    def ring(self) -> None:
        """The doorbell's socket is readable: a queue changed (or the connection broke)."""
        self._rung = True
        doorbell = self._doorbell
        if doorbell is None:
            return
        try:
            doorbell.drain()
        except self.connection_errors:
            logger.debug("doorbell: connection lost; reconnecting", exc_info=True)
            self._drop_doorbell(self.connection.cycle)

    def _drop_doorbell(self, cycle: kombu_redis.MultiChannelPoller) -> None:
        doorbell, self._doorbell = self._doorbell, None
        if doorbell is None:
            return
        sock = cycle._chan_to_sock.pop((self, doorbell, "WAKE"), None)
        if sock is not None:
            try:
                fileno = sock.fileno()
                cycle._fd_to_chan.pop(fileno, None)
                cycle._unregister_from_poll(fileno)
            except (KeyError, ValueError, OSError):
                pass
        with contextlib.suppress(*self.connection_errors):
            doorbell.close()

    # --- closing ----------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return super().close()
        cycle = self.connection.cycle if self.connection else None
        pulse = self._pulse
        if cycle is not None:
            self._drop_doorbell(cycle)
        if self._acks_in_fetch:
            self._acks_unconfirmed(self._acks_in_fetch, ConnectionError("closing before the fetch reply"))
            self._acks_in_fetch = []
        if self._acks:
            with contextlib.suppress(*self.connection_errors):
                self.flush_acks()  # what it cannot send stays in flight: the reaper returns it
        if pulse is None:
            return super().close()
        pulse.stop()
        if self._pending_settles:
            with contextlib.suppress(*self.connection_errors):
                self._settle_pending()  # else the reaper returns them, and the claim stops a second run
        client = self._create_client()
        super().close()  # kombu restores this channel's unacked messages
        try:
            client.delete(self.heartbeat_key)
            pipe = client.pipeline()
            pipe.scard(self.inflight_key).hlen(self.held_key)
            left_inflight, left_held = pipe.execute()
            if not left_inflight and not left_held:
                client.zrem(self.registry_key, self.consumer_id)
            # else: the reaper returns what is left, now that the heartbeat is gone
        except self.connection_errors:
            logger.debug("consumer %s: could not sign off; the reaper will", self.consumer_id)
        finally:
            client.connection_pool.disconnect()


class MultiChannelPoller(kombu_redis.MultiChannelPoller):
    """kombu's poller, plus each channel's doorbell, and a wait that never outlasts a due fetch."""

    def on_poll_start(self) -> None:
        super().on_poll_start()  # sends each channel's due fetch, with its acks
        for channel in self._channels:
            if isinstance(channel, Channel):
                channel.ensure_doorbell(self)
                if channel._acks:  # acks no fetch took along: one round trip at the end of the turn
                    channel.flush_acks()

    def handle_event(self, fileno: int, event: int) -> Any:
        chan_type = self._fd_to_chan.get(fileno)
        if chan_type is not None and chan_type[1] == "WAKE":
            chan_type[0].ring()
            return None  # nothing delivered yet: the next tick fetches
        return super().handle_event(fileno, event)

    def on_readable(self, fileno: int) -> Any:
        chan_type = self._fd_to_chan.get(fileno)
        if chan_type is not None and chan_type[1] == "WAKE":
            return chan_type[0].ring()  # whether or not the channel may consume now
        return super().on_readable(fileno)

    def get(self, callback: Any, timeout: float | None = None) -> Any:
        waits = [
            wait
            for channel in self._channels
            if isinstance(channel, Channel) and (wait := channel.seconds_to_next_fetch()) is not None
        ]
        if waits:
            timeout = min(waits) if timeout is None else min(timeout, *waits)
        return super().get(callback, timeout=timeout)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the reliable-fetch channel (see the module doc)."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = MultiChannelPoller()

    #: Set once a Celery worker's event loop drives this transport: its channels batch acks.
    event_loop_registered = False

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        self.event_loop_registered = True
        old = getattr(self.cycle, "_fetch_poll_tref", None)
        if old is not None:
            old.cancel()
        interval = connection.client.transport_options.get("fetch_poll_interval", Channel.fetch_poll_interval)
        # A timer wakes the event loop, whose tick then fetches for any idle channel that is due.
        self.cycle._fetch_poll_tref = loop.call_repeatedly(interval, _noop)


def _noop() -> None:
    return None


def register() -> None:
    """Makes redis:// and rediss:// URLs use this transport in this process (kombu's own alias table)."""
    for scheme in ("redis", "rediss"):
        kombu_transports.TRANSPORT_ALIASES[scheme] = "delivery.redis:Transport"
        kombu_transports._transport_cache.pop(scheme, None)
