"""The throughput chart's time axis: labels that read forwards, with dates once a window crosses midnight."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from django.test import override_settings

from monitoring.charts import throughput_chart
from monitoring.stats import Bin


def labels(since: datetime, window: timedelta, bins: int = 60) -> list[str]:
    step = window / bins
    svg = throughput_chart([Bin(start=since + step * i) for i in range(bins)], title="t")
    return re.findall(r'<text class="tick"[^>]*>([^<]+)</text>', svg)


@override_settings(TIME_ZONE="UTC")
def test_a_24_hour_window_labels_its_ticks_with_dates_in_order() -> None:
    ticks = labels(datetime(2026, 11, 27, 14, 40, tzinfo=UTC), timedelta(hours=24))

    assert ticks == ["Nov 27 14:40", "Nov 27 20:40", "Nov 28 02:40", "Nov 28 08:40", "Nov 28 14:40 UTC"]


@override_settings(TIME_ZONE="UTC")
def test_a_7_day_window_labels_its_ticks_with_dates() -> None:
    ticks = labels(datetime(2026, 11, 21, 12, 0, tzinfo=UTC), timedelta(days=7))

    assert ticks[0] == "Nov 21 12:00" and ticks[-1] == "Nov 28 12:00 UTC"
    assert ticks[2] == "Nov 25 00:00"


@override_settings(TIME_ZONE="Europe/Berlin")
def test_an_hour_within_one_day_shows_times_in_the_local_zone() -> None:
    ticks = labels(datetime(2026, 11, 28, 10, 0, tzinfo=UTC), timedelta(hours=1))

    assert ticks == ["11:00", "11:15", "11:30", "11:45", "12:00 CET"]
