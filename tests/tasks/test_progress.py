"""Progress reports are stored at most once per interval, the first and the last always."""

from __future__ import annotations

from tasks.progress import throttled


def test_progress_reports_pass_at_most_once_per_interval_and_the_last_always() -> None:
    now = [0.0]
    stored: list[tuple[float, str]] = []
    report = throttled(lambda percent, message: stored.append((percent, message)), 1.0, lambda: now[0])

    for step, at in enumerate((0.0, 0.2, 0.9, 1.0, 1.5, 2.1)):
        now[0] = at
        report(step * 10, f"step {step}")
    report(100, "done")

    assert stored == [(0, "step 0"), (30, "step 3"), (50, "step 5"), (100, "done")]
