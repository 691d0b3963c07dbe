"""Cron expressions in a time zone, with one stated policy for DST changes.

`Cron.parse("30 1 * * *", "America/New_York")` reads the five fields the way
Celery's `crontab` does (minute hour day-of-month month day-of-week; Sunday is
0; names such as `fri` and `jan` work; day of month and day of week must
*both* match, as in Celery) and answers, in UTC instants, when it runs.

Local wall-clock times that do not map to exactly one instant follow this policy:

- **Clocks go back** (a wall time happens twice, e.g. 01:30 on the first Sunday of
  November in New York): a job with fixed hours runs once, at the first of the two;
  a job whose hour field is `*` runs every elapsed hour, so both.
- **Clocks go forward** (a wall time never happens, e.g. 02:30 on the second Sunday
  of March in New York): the job runs once, shifted forward by the length of the gap
  (02:30 → 03:30 EDT), which is what PEP 495 gives for `fold=0`. A time the shift
  lands on that the job runs at anyway (an hourly `30 * * * *`) runs once.

Everything is computed from the zone database (zoneinfo), never from a fixed offset.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from celery.schedules import crontab_parser

# (name, size, first value, description of the valid range) in crontab order.
FIELDS = (
    ("minute", 60, 0, "0-59"),
    ("hour", 24, 0, "0-23"),
    ("day_of_month", 31, 1, "1-31"),
    ("month_of_year", 12, 1, "1-12 or jan-dec"),
    ("day_of_week", 7, 0, "0-6 or sun-sat, Sunday is 0"),
)
# How far ahead to look for a match: "Feb 29 that is a Monday" comes back every 28 years.
HORIZON_DAYS = 366 * 29


class CronError(ValueError):
    """An expression or time zone that cannot be used; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def parse_field(name: str, value: str) -> frozenset[int]:
    """One crontab field as the set of values it matches, or CronError naming the field and its range."""
    for field_name, size, first, valid in FIELDS:
        if field_name == name:
            text = str(value).strip().lower()
            if not text:
                raise CronError(name, f"{name.replace('_', ' ')} is empty (valid: {valid}, or *)")
            try:
                return frozenset(crontab_parser(size, first).parse(text))
            except (ValueError, KeyError, IndexError) as error:
                raise CronError(
                    name, f"{name.replace('_', ' ')} {value!r} is not valid: {error} (valid: {valid})"
                ) from None
    raise KeyError(name)


def parse_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError):
        raise CronError(
            "timezone", f"time zone {name!r} is not known (use an IANA name such as Europe/Berlin)"
        ) from None


@lru_cache(maxsize=1024)
def _parse(*fields: str) -> tuple[tuple[frozenset[int], ...], tuple[int, ...]]:
    """The fields' value sets and the sorted minutes of the day, shared by equal expressions
    (1,000 `* * * * *` schedules hold one 1,440-entry tuple, not 1,000)."""
    sets = tuple(parse_field(name, value) for (name, *_), value in zip(FIELDS, fields, strict=True))
    minutes, hours = sets[0], sets[1]
    return sets, tuple(sorted(h * 60 + m for h in hours for m in minutes))


@dataclass(frozen=True)
class Occurrence:
    at: datetime  # the instant, in UTC
    local: datetime  # the same instant on the schedule's wall clock
    dst: str  # "" or a note: "clocks go back: first of two 01:30", "clocks go forward: 02:30 → 03:30"


@dataclass(frozen=True)
class Cron:
    minute: str
    hour: str
    day_of_month: str
    month_of_year: str
    day_of_week: str
    zone: ZoneInfo
    _sets: tuple[frozenset[int], ...] = field(init=False, repr=False, compare=False)
    _minutes_of_day: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sets, minutes_of_day = _parse(
            self.minute, self.hour, self.day_of_month, self.month_of_year, self.day_of_week
        )
        object.__setattr__(self, "_sets", sets)
        object.__setattr__(self, "_minutes_of_day", minutes_of_day)

    @classmethod
    def parse(cls, expression: str, zone: str | ZoneInfo = "UTC") -> Cron:
        parts = str(expression).split()
        if len(parts) != 5:
            raise CronError(
                "expression",
                f"cron expression {expression!r} has {len(parts)} fields; it needs 5: "
                "minute hour day-of-month month day-of-week",
            )
        minute, hour, day_of_month, month_of_year, day_of_week = parts
        return cls(
            minute,
            hour,
            day_of_month,
            month_of_year,
            day_of_week,
            zone=zone if isinstance(zone, ZoneInfo) else parse_zone(zone),
        )

    @classmethod
    def of(cls, crontab: Any) -> Cron:
        """The Cron of a django-celery-beat CrontabSchedule row."""
        return cls(
            crontab.minute,
            crontab.hour,
            crontab.day_of_month,
            crontab.month_of_year,
            crontab.day_of_week,
            zone=crontab.timezone,
        )

    @property
    def expression(self) -> str:
        return " ".join((self.minute, self.hour, self.day_of_month, self.month_of_year, self.day_of_week))

    @property
    def every_hour(self) -> bool:
        return len(self._sets[1]) == 24

    def describe(self) -> str:
        """A sentence a person can check the expression against: "At 10:00 AM, only on Friday"."""
        from cron_descriptor import Options, get_description

        options = Options()
        options.use_24hour_time_format = True
        options.throw_exception_on_parse_error = False
        return str(get_description(self.expression, options))

    # --- when it runs ------------------------------------------------------------------

    def next_after(self, moment: datetime) -> datetime | None:
        """The first instant strictly after `moment` (aware) at which it runs, in UTC; None if never."""
        moment = moment.astimezone(UTC)
        day = moment.astimezone(self.zone).date() - timedelta(days=1)
        for _ in range(HORIZON_DAYS):
            if self._runs_on(day):
                later = [at for at, _ in self._instants(day, after=moment, limit=1)]
                if later:
                    return min(later)
            day += timedelta(days=1)
        return None

    def latest_at_or_before(self, moment: datetime) -> datetime | None:
        """The last instant at or before `moment` at which it ran (or should have), in UTC."""
        moment = moment.astimezone(UTC)
        day = moment.astimezone(self.zone).date() + timedelta(days=1)
        for _ in range(HORIZON_DAYS):
            if self._runs_on(day):
                earlier = [at for at, _ in self._instants(day, at_or_before=moment)]
                if earlier:
                    return max(earlier)
            day -= timedelta(days=1)
        return None

    def upcoming(self, moment: datetime, count: int = 5) -> list[Occurrence]:
        """The next `count` runs after `moment`, each with a note when it falls on a DST change."""
        found: list[Occurrence] = []
        day = moment.astimezone(self.zone).date() - timedelta(days=1)
        for _ in range(HORIZON_DAYS):
            if len(found) >= count:
                break
            if self._runs_on(day):
                seen = {occurrence.at for occurrence in found}
                for at, note in sorted(self._instants(day, after=moment.astimezone(UTC), limit=count)):
                    if at not in seen:
                        seen.add(at)
                        found.append(Occurrence(at, at.astimezone(self.zone), note))
            day += timedelta(days=1)
        return found[:count]

    def iter_between(self, start: datetime, end: datetime) -> Iterator[datetime]:
        """Every instant in (start, end], in order."""
        moment = start
        while (following := self.next_after(moment)) is not None and following <= end:
            yield following
            moment = following

    # --- the calendar ------------------------------------------------------------------

    def _runs_on(self, day: date) -> bool:
        _, _, days_of_month, months, days_of_week = self._sets
        return day.month in months and day.day in days_of_month and day.isoweekday() % 7 in days_of_week

    def _instants(
        self,
        day: date,
        after: datetime | None = None,
        at_or_before: datetime | None = None,
        limit: int | None = None,
    ) -> list[tuple[datetime, str]]:
        """The instants (UTC) of `day`'s runs in the window (after, at_or_before], with DST notes.

        On a day without an offset change only the first `limit` (or, with `at_or_before`
        alone, the last one) are returned; on a day with one, all in the window.
        """
        midnight = datetime.combine(day, time(0), tzinfo=self.zone)
        next_midnight = datetime.combine(day + timedelta(days=1), time(0), tzinfo=self.zone)
        offsets = {midnight.utcoffset(), midnight.replace(fold=1).utcoffset(), next_midnight.utcoffset()}
        if len(offsets) == 1:
            # No change of offset today (nearly every day): local minutes map straight to UTC.
            base = datetime.combine(day, time(0)).replace(tzinfo=UTC) - midnight.utcoffset()  # type: ignore[operator]
            minutes = self._minutes_of_day
            start, end = 0, len(minutes)
            if after is not None:
                start = bisect_right(minutes, int((after - base).total_seconds() // 60))
            if at_or_before is not None:
                end = bisect_right(minutes, int((at_or_before - base).total_seconds() // 60))
                if after is None and limit is None:
                    start = max(start, end - 1)
            if limit is not None:
                end = min(end, start + limit)
            return [(base + timedelta(minutes=minute), "") for minute in minutes[start:end]]
        instants = _day_of_change(self, day)
        start, end = 0, len(instants)
        if after is not None:
            start = bisect_right(instants, after, key=lambda instant: instant[0])
        if at_or_before is not None:
            end = bisect_right(instants, at_or_before, key=lambda instant: instant[0])
        return list(instants[start:end])

    def _resolve(self, wall: datetime) -> list[tuple[datetime, str]]:
        first = wall.replace(tzinfo=self.zone, fold=0)
        second = wall.replace(tzinfo=self.zone, fold=1)
        label = wall.strftime("%H:%M")
        if first.utcoffset() == second.utcoffset():
            return [(first.astimezone(UTC), "")]
        if first.astimezone(UTC).astimezone(self.zone).replace(tzinfo=None) != wall:
            shifted = first.astimezone(UTC).astimezone(self.zone).strftime("%H:%M")
            return [(first.astimezone(UTC), f"clocks go forward: {label} does not exist, runs at {shifted}")]
        if self.every_hour:
            return [
                (first.astimezone(UTC), f"clocks go back: first of two {label}"),
                (second.astimezone(UTC), f"clocks go back: second of two {label}"),
            ]
        return [(first.astimezone(UTC), f"clocks go back: runs at the first of two {label} only")]


@lru_cache(maxsize=256)
def _day_of_change(cron: Cron, day: date) -> tuple[tuple[datetime, str], ...]:
    """Every run of a day whose UTC offset changes, in order: worked out once per (schedule, day).

    A `* * * * *` job resolves 1,440 wall-clock minutes on such a day; beat asks several
    times a minute, so the answer is kept (a few distinct schedules, two days a year).
    """
    found: dict[datetime, str] = {}
    for minute in cron._minutes_of_day:
        for at, note in cron._resolve(datetime.combine(day, time(minute // 60, minute % 60))):
            if at not in found or not note:  # a run due there anyway needs no DST note
                found[at] = note
    return tuple(sorted(found.items()))
