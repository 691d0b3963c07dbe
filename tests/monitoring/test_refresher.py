"""monitoring.refresher: readers get the last value at once, whatever the computation does."""

from __future__ import annotations

import os
import threading

from monitoring.refresher import Refresher


def test_a_hanging_refresh_never_holds_a_reader() -> None:
    release = threading.Event()
    values = iter(["first", "second"])

    def compute() -> str:
        value = next(values)
        if value == "second":
            release.wait()  # a frozen broker: this refresh never ends until the test lets it
        return value

    refresher = Refresher("hanging", compute, every=lambda: 0.01)
    try:
        assert refresher.latest(wait=30)[0] == "first"
        # Had a reader waited for the hanging refresh, these would never return.
        for _ in range(100):
            value, age = refresher.latest(wait=30)
            assert value == "first" and age is not None
        assert refresher.latest()[1] >= age  # type: ignore[operator]  # it ages, it is not replaced
    finally:
        release.set()
        refresher.stop()


def test_a_cold_reader_waits_no_longer_than_asked_for_the_first_value() -> None:
    release = threading.Event()
    refresher = Refresher("cold", lambda: release.wait() and "late", every=lambda: 60)
    try:
        assert refresher.latest(wait=0.05) == (None, None)
    finally:
        release.set()
        refresher.stop()


def test_a_forked_child_computes_its_own_value_in_a_thread_of_its_own() -> None:
    refresher = Refresher("forked", os.getpid, every=lambda: 60)
    try:
        assert refresher.latest(wait=30)[0] == os.getpid()
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the child: answer through the pipe, then leave without pytest's teardown
            try:
                value, _ = refresher.latest(wait=30)
                os.write(write, str(value).encode())
            finally:
                os._exit(0)
        os.close(write)
        answer = os.read(read, 100).decode()
        os.waitpid(child, 0)
        os.close(read)
        assert answer == str(child)  # not the parent's value, nor nothing (no thread survives a fork)
    finally:
        refresher.stop()
