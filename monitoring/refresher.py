"""A value kept fresh by a thread of its own, so that a request reads it and never waits for it.

`Refresher(compute, every)` calls `compute()` in a daemon thread every `every` seconds for as
long as somebody read it within `idle_after` seconds; `latest()` answers the last value and its
age at once. However many requests read it, `compute()` runs at most once per interval in a
process, and a slow or hanging `compute()` (a frozen broker) holds its own thread only: readers
see the value age instead. The thread starts on the first read (so a process that is never asked
does nothing) and again in a forked child (threads do not survive a fork).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Refresher(Generic[T]):
    def __init__(
        self, name: str, compute: Callable[[], T], every: Callable[[], float], idle_after: float = 60.0
    ) -> None:
        self.name = name
        self.compute = compute
        # A callable, so the interval follows settings changed after start-up (tests).
        self.every = every
        self.idle_after = idle_after
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._value: T | None = None
        self._at = 0.0  # time.monotonic() when _value was computed
        self._started_at = 0.0  # ... and when the thread was started
        self._asked = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def latest(self, wait: float = 0.0) -> tuple[T | None, float | None]:
        """The last value and its age in seconds, or (None, None) before the first one.

        Starts the thread if it is not running. Only while the thread has computed nothing yet
        since it started, the caller waits for its first value, until `wait` seconds after
        the start at most; otherwise it never waits.
        """
        with self._lock:
            now = time.monotonic()
            self._asked = now
            if self._thread is None or not self._thread.is_alive():
                self._stop = threading.Event()
                self._started_at = now
                self._thread = threading.Thread(
                    target=self._run, args=(self._stop,), name=f"refresh-{self.name}", daemon=True
                )
                self._thread.start()
            if self._at < self._started_at:
                self._changed.wait_for(lambda: self._at >= self._started_at, self._started_at + wait - now)
            if self._value is None:
                return None, None
            return self._value, max(0.0, time.monotonic() - self._at)

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._lock:
                if time.monotonic() - self._asked > self.idle_after:
                    if self._thread is threading.current_thread():
                        self._thread = None  # idle: the next reader starts a new thread
                    return
            try:
                value = self.compute()
            except Exception:  # compute() reports its own failures; this is a bug in it
                logger.exception("refreshing %s failed", self.name)
            else:
                with self._lock:
                    if stop.is_set():  # stopped while computing: the value is not wanted
                        return
                    self._value, self._at = value, time.monotonic()
                    self._changed.notify_all()
            stop.wait(self.every())

    def stop(self) -> None:
        """Stops the thread and forgets the value (the next reader starts afresh)."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
            self._value, self._at = None, 0.0
        if thread is not None:
            thread.join(timeout=30)
