"""Progress reports a task can make as often as it likes, stored at most once a second.

Each report is a write to the result backend (a database row): a batch reporting every 10
messages, an image pipeline after every step or a sync after every page paid that write many
times a second, more than the work it described in the fast cases.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Report = Callable[[float, str], None]


def throttled(report: Report, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> Report:
    """`report`, passed on for the first call, the last (100%) and at most once per `interval`
    seconds in between."""
    last: float | None = None

    def maybe_report(percent: float, message: str = "") -> None:
        nonlocal last
        now = clock()
        if last is None or percent >= 100 or now - last >= interval:
            last = now
            report(percent, message)

    return maybe_report
