"""Counting tasks from Celery signals, cheaply.

Every process (web, beat, each worker pool process) adds to an in-memory buffer under a
lock, and a daemon thread flushes the buffer to Redis every METRICS_FLUSH_SECONDS in one
pipelined round trip: no database write, no network call on a task's path. The roll-up
task (monitoring/rollup.py) moves the per-minute hashes into the database.

The queue wait is measured from a header stamped when the message is published (or from
its ETA, for a countdown), to the moment a worker starts the task. Clocks of the publishing
and the consuming machines must agree (NTP) for it to mean anything across machines.

What is lost: at most the last METRICS_FLUSH_SECONDS of counts of a process that is
killed (SIGKILL, OOM); a warm shutdown flushes.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import defaultdict
from datetime import datetime
from typing import Any

from celery import signals
from django.conf import settings

from config import brokers
from monitoring import metrics
from tasks import quarantine

logger = logging.getLogger(__name__)

PUBLISHED_HEADER = "x_published_at"
MINUTE_KEY_TTL = 2 * 24 * 3600  # a minute hash nobody rolled up (roll-up stopped) is dropped after this


class Buffer:
    """Counts in memory, flushed to Redis by a daemon thread. One per process (fork-aware)."""

    def __init__(self, redis_url: str, flush_every: float) -> None:
        self.redis_url = redis_url
        self.flush_every = flush_every
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # After a fork the parent's pending counts belong to the parent, and its thread and
        # lock did not come along: start afresh.
        self.lock = threading.Lock()
        self.counts: defaultdict[tuple[int, str], int] = defaultdict(int)
        self.started: dict[str, tuple[float, str, str, float | None]] = {}
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()
        self._client: Any = None

    # --- the hot path -------------------------------------------------------

    def add(self, at: float, task: str, queue: str, name: str, amount: int = 1) -> None:
        minute = int(at // 60) * 60
        key = metrics.field(task, queue, name)
        with self.lock:
            self.counts[(minute, key)] += amount
        if self.thread is None:
            self._start()

    def observe(self, at: float, task: str, queue: str, histogram: str, seconds: float) -> None:
        minute = int(at // 60) * 60
        bucket = metrics.field(task, queue, f"{histogram}:{metrics.bucket_index(seconds)}")
        total = metrics.field(task, queue, f"{histogram}_sum")
        with self.lock:
            self.counts[(minute, bucket)] += 1
            self.counts[(minute, total)] += max(0, int(seconds * 1_000_000))
        if self.thread is None:
            self._start()

    # --- flushing -----------------------------------------------------------

    def _start(self) -> None:
        with self.lock:
            if self.thread is not None:
                return
            self.thread = threading.Thread(target=self._run, name="metrics-flush", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while True:
            self.wake.wait(self.flush_every)
            self.wake.clear()
            self.flush()

    def client(self) -> Any:
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(
                self.redis_url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
            )
        return self._client

    def flush(self) -> None:
        with self.lock:
            if not self.counts:
                return
            pending, self.counts = self.counts, defaultdict(int)
        by_minute: defaultdict[int, dict[str, int]] = defaultdict(dict)
        totals: dict[str, int] = {}
        for (minute, key), amount in pending.items():
            by_minute[minute][key] = amount
            totals[key] = totals.get(key, 0) + amount
        try:
            pipe = self.client().pipeline(transaction=False)
            for minute, fields in by_minute.items():
                key = metrics.minute_key(minute)
                for name, amount in fields.items():
                    pipe.hincrby(key, name, amount)
                pipe.expire(key, MINUTE_KEY_TTL)
                pipe.zadd(metrics.MINUTES_KEY, {str(minute): minute})
            for name, amount in totals.items():
                pipe.hincrby(metrics.TOTALS_KEY, name, amount)
            pipe.execute()
        except Exception:
            # Put them back: the next flush tries again (Redis restarting, a network blip).
            with self.lock:
                for item, amount in pending.items():
                    self.counts[item] += amount
            logger.warning("metrics: could not flush to Redis; keeping the counts for the next try")


_buffer: Buffer | None = None


def buffer() -> Buffer | None:
    return _buffer


def _queue_of(delivery_info: dict[str, Any] | None) -> str:
    info = delivery_info or {}
    return brokers.queue_of(info.get("routing_key") or info.get("exchange") or "default")


def _eta_epoch(eta: Any) -> float | None:
    if not eta:
        return None
    try:
        return (eta if isinstance(eta, datetime) else datetime.fromisoformat(str(eta))).timestamp()
    except (TypeError, ValueError):
        return None


# --- signal handlers: each catches everything, a metric never fails a task. -----------


def on_publish(sender: str | None = None, headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    try:
        now = time.time()
        if headers is not None:
            headers[PUBLISHED_HEADER] = now
        task = sender or (headers or {}).get("task") or "unknown"
        assert _buffer is not None
        _buffer.add(now, task, brokers.queue_of(kwargs.get("routing_key") or "default"), "sent")
    except Exception:
        logger.exception("metrics: publish handler failed")


def on_prerun(task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    try:
        now = time.time()
        request = task.request
        queue = _queue_of(request.delivery_info)
        published = getattr(request, PUBLISHED_HEADER, None) or (request.headers or {}).get(PUBLISHED_HEADER)
        wait = None
        if published is not None:
            ready_at = max(float(published), _eta_epoch(request.eta) or 0.0)
            wait = max(0.0, now - ready_at)
        assert _buffer is not None
        _buffer.started[task_id or ""] = (time.monotonic(), task.name, queue, wait)
    except Exception:
        logger.exception("metrics: prerun handler failed")


OUTCOME_OF_STATE = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried", "REJECTED": "rejected"}


def on_postrun(task_id: str | None = None, task: Any = None, state: str | None = None, **kwargs: Any) -> None:
    try:
        assert _buffer is not None
        started = _buffer.started.pop(task_id or "", None)
        if started is None:
            return
        began, name, queue, wait = started
        now = time.time()
        outcome = OUTCOME_OF_STATE.get(state or "")
        if outcome:
            _buffer.add(now, name, queue, outcome)
        _buffer.observe(now, name, queue, "rt", time.monotonic() - began)
        if wait is not None:
            _buffer.observe(now, name, queue, "wt", wait)
    except Exception:
        logger.exception("metrics: postrun handler failed")


def _exception_counter(exception: BaseException | None, sender: Any) -> None:
    name = type(exception).__name__ if exception is not None else "Unknown"
    queue = _queue_of(getattr(getattr(sender, "request", None), "delivery_info", None))
    assert _buffer is not None
    _buffer.add(time.time(), getattr(sender, "name", "unknown"), queue, f"exc:{name}")


def on_failure(sender: Any = None, task_id: str | None = None, exception: Any = None, **kwargs: Any) -> None:
    try:
        assert _buffer is not None
        if task_id not in _buffer.started:
            # Not run in this process (a hard time limit killed the pool process, and the
            # main process reports it): no postrun will count it.
            queue = _queue_of(getattr(getattr(sender, "request", None), "delivery_info", None))
            _buffer.add(time.time(), getattr(sender, "name", "unknown"), queue, "failed")
        _exception_counter(exception, sender)
    except Exception:
        logger.exception("metrics: failure handler failed")


def on_retry(sender: Any = None, reason: Any = None, **kwargs: Any) -> None:
    try:
        cause = getattr(reason, "exc", None) if reason is not None else None
        _exception_counter(cause if isinstance(cause, BaseException) else None, sender)
    except Exception:
        logger.exception("metrics: retry handler failed")


def on_revoked(request: Any = None, sender: Any = None, **kwargs: Any) -> None:
    try:
        assert _buffer is not None
        # sender is the task; request is the revoked message's Context (or a worker Request).
        name = (
            getattr(sender, "name", None)
            or getattr(request, "task", None)
            or getattr(request, "task_name", None)
            or "unknown"
        )
        _buffer.add(time.time(), name, _queue_of(getattr(request, "delivery_info", None)), "revoked")
    except Exception:
        logger.exception("metrics: revoked handler failed")


def on_rejected(message: Any = None, **kwargs: Any) -> None:
    try:
        assert _buffer is not None
        headers = getattr(message, "headers", None) or {}
        info = getattr(message, "delivery_info", None)
        _buffer.add(time.time(), str(headers.get("task") or "unknown"), _queue_of(info), "rejected")
    except Exception:
        logger.exception("metrics: rejected handler failed")


def on_quarantined(
    queue: str = "", kind: str = "", task: str = "", source: str = "worker", **kwargs: Any
) -> None:
    """A message kept in the quarantine: `exc:quarantined:<kind>` under its task (or "unknown").

    The worker's poison messages are also counted `rejected` through Celery's signals; those
    the transport refused never reached Celery, so they are counted `rejected` here."""
    try:
        assert _buffer is not None
        now = time.time()
        name = task or "unknown"
        _buffer.add(now, name, queue or "unknown", f"exc:quarantined:{kind or 'unknown'}")
        if source == "transport":
            _buffer.add(now, name, queue or "unknown", "rejected")
    except Exception:
        logger.exception("metrics: quarantine handler failed")


def on_shutdown(**kwargs: Any) -> None:
    if _buffer is not None:
        _buffer.flush()


def install() -> None:
    """Connects the handlers (once per process); does nothing when collection is off."""
    global _buffer
    if _buffer is not None or not settings.METRICS_ENABLED:
        return
    if not settings.METRICS_REDIS_URL:
        logger.warning("metrics: METRICS_REDIS_URL is empty (the broker is not Redis): collection is off")
        return
    _buffer = Buffer(settings.METRICS_REDIS_URL, settings.METRICS_FLUSH_SECONDS)
    signals.before_task_publish.connect(on_publish, weak=False)
    signals.task_prerun.connect(on_prerun, weak=False)
    signals.task_postrun.connect(on_postrun, weak=False)
    signals.task_failure.connect(on_failure, weak=False)
    signals.task_retry.connect(on_retry, weak=False)
    signals.task_revoked.connect(on_revoked, weak=False)
    signals.task_rejected.connect(on_rejected, weak=False)
    signals.task_unknown.connect(on_rejected, weak=False)
    quarantine.message_quarantined.connect(on_quarantined, weak=False)
    signals.worker_process_shutdown.connect(on_shutdown, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
    atexit.register(on_shutdown)
