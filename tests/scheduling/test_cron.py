"""Cron in a time zone: when it runs, and what it does on the days clocks change."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta

import pytest

from scheduling.cron import Cron, CronError
from tests.scheduling.beatdriver import utc


def local_runs(cron: Cron, start: datetime, end: datetime) -> list[str]:
    return [at.astimezone(cron.zone).strftime("%m-%d %H:%M %Z") for at in cron.iter_between(start, end)]


# America/New_York: clocks went back on Sun 2026-11-01 02:00 EDT -> 01:00 EST and
# forward on Sun 2026-03-08 02:00 EST -> 03:00 EDT.
# Europe/Berlin: back on Sun 2026-10-25 03:00 CEST -> 02:00 CET, forward on Sun 2026-03-29 02:00 -> 03:00.


def test_a_daily_0130_job_in_new_york_runs_once_on_the_day_clocks_fall_back() -> None:
    cron = Cron.parse("30 1 * * *", "America/New_York")

    runs = local_runs(cron, utc(2026, 10, 31), utc(2026, 11, 3))

    assert runs == ["10-31 01:30 EDT", "11-01 01:30 EDT", "11-02 01:30 EST"]


def test_an_hourly_job_runs_in_both_of_the_repeated_hours() -> None:
    cron = Cron.parse("30 * * * *", "America/New_York")

    runs = local_runs(cron, utc(2026, 11, 1, 4), utc(2026, 11, 1, 8))  # 00:00 EDT .. 03:00 EST

    assert runs == ["11-01 00:30 EDT", "11-01 01:30 EDT", "11-01 01:30 EST", "11-01 02:30 EST"]
    instants = list(cron.iter_between(utc(2026, 11, 1, 4), utc(2026, 11, 1, 8)))
    assert {later - earlier for earlier, later in itertools.pairwise(instants)} == {timedelta(hours=1)}


def test_a_0230_job_runs_at_0330_on_the_day_clocks_spring_forward_in_new_york() -> None:
    cron = Cron.parse("30 2 * * *", "America/New_York")

    runs = local_runs(cron, utc(2026, 3, 7), utc(2026, 3, 10))

    assert runs == ["03-07 02:30 EST", "03-08 03:30 EDT", "03-09 02:30 EDT"]


def test_an_hourly_job_runs_once_at_0330_when_0230_does_not_exist() -> None:
    cron = Cron.parse("30 * * * *", "America/New_York")

    runs = local_runs(cron, utc(2026, 3, 8, 5), utc(2026, 3, 8, 9))  # 00:00 EST .. 05:00 EDT

    assert runs == ["03-08 00:30 EST", "03-08 01:30 EST", "03-08 03:30 EDT", "03-08 04:30 EDT"]


def test_berlin_fall_back_and_spring_forward() -> None:
    cron = Cron.parse("30 2 * * *", "Europe/Berlin")

    assert local_runs(cron, utc(2026, 10, 24), utc(2026, 10, 27)) == [
        "10-24 02:30 CEST",
        "10-25 02:30 CEST",  # the first of the two 02:30s only
        "10-26 02:30 CET",
    ]
    assert local_runs(cron, utc(2026, 3, 28), utc(2026, 3, 31)) == [
        "03-28 02:30 CET",
        "03-29 03:30 CEST",  # 02:30 does not exist: shifted by the gap
        "03-30 02:30 CEST",
    ]


def test_every_minute_across_a_change_never_repeats_or_goes_back_in_time() -> None:
    for zone, start in (("America/New_York", utc(2026, 11, 1, 4)), ("Europe/Berlin", utc(2026, 3, 29, 0))):
        cron = Cron.parse("* * * * *", zone)
        instants = list(cron.iter_between(start, start + timedelta(hours=4)))
        assert len(instants) == 4 * 60
        assert instants == sorted(set(instants))


def test_upcoming_runs_mark_the_ones_on_a_clock_change() -> None:
    cron = Cron.parse("30 1 * * *", "America/New_York")

    runs = cron.upcoming(utc(2026, 10, 30, 12), 3)

    assert [run.dst for run in runs] == ["", "clocks go back: runs at the first of two 01:30 only", ""]
    spring = Cron.parse("30 2 * * *", "America/New_York").upcoming(utc(2026, 3, 7, 12), 1)[0]
    assert spring.dst == "clocks go forward: 02:30 does not exist, runs at 03:30"
    assert spring.local.strftime("%H:%M %Z") == "03:30 EDT"


def test_latest_at_or_before_names_the_occurrence_that_is_due() -> None:
    cron = Cron.parse("0 */6 * * *", "UTC")

    assert cron.latest_at_or_before(utc(2026, 11, 23, 13, 59)) == utc(2026, 11, 23, 12)
    assert cron.latest_at_or_before(utc(2026, 11, 23, 12)) == utc(2026, 11, 23, 12)
    assert cron.next_after(utc(2026, 11, 23, 12)) == utc(2026, 11, 23, 18)


def test_day_of_month_and_day_of_week_must_both_match_as_in_celery() -> None:
    cron = Cron.parse("0 10 13 * 5", "UTC")  # Friday the 13th

    assert cron.next_after(utc(2026, 1, 1)) == utc(2026, 2, 13, 10)


def test_a_date_that_never_comes_has_no_next_run() -> None:
    assert Cron.parse("0 0 31 2 *", "UTC").next_after(utc(2026, 1, 1)) is None


@pytest.mark.parametrize(
    ("expression", "field", "message"),
    [
        ("61 * * * *", "minute", "minute '61' is not valid: Invalid end range: 61 > 59. (valid: 0-59)"),
        ("0 24 * * *", "hour", "(valid: 0-23)"),
        (
            "0 0 0 * *",
            "day_of_month",
            "day of month '0' is not valid: Invalid beginning range: 0 < 1. (valid: 1-31)",
        ),
        ("0 0 * 13 *", "month_of_year", "(valid: 1-12 or jan-dec)"),
        ("0 0 * * 7", "day_of_week", "(valid: 0-6 or sun-sat, Sunday is 0)"),
        ("0 0 * * xyz", "day_of_week", "day of week 'xyz' is not valid"),
        ("0 0 * *", "expression", "has 4 fields; it needs 5"),
    ],
)
def test_a_bad_field_is_refused_naming_the_field_and_its_range(
    expression: str, field: str, message: str
) -> None:
    with pytest.raises(CronError) as refused:
        Cron.parse(expression, "UTC")

    assert refused.value.field == field
    assert message in str(refused.value)


def test_an_unknown_time_zone_is_refused() -> None:
    with pytest.raises(CronError, match="time zone 'Mars/Olympus' is not known") as refused:
        Cron.parse("0 0 * * *", "Mars/Olympus")
    assert refused.value.field == "timezone"


def test_it_describes_itself_in_words() -> None:
    assert Cron.parse("0 10 * * 5", "UTC").describe() == "At 10:00, only on Friday"
    assert Cron.parse("0 */6 * * *", "UTC").describe() == "Every 6 hours"
