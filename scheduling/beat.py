"""The beat scheduler: django-celery-beat's DatabaseScheduler, made safe to run twice.

`celery -A config beat -S scheduling.beat:Scheduler` (the default, CELERY_BEAT_SCHEDULER).
On top of the DatabaseScheduler it:

- dispatches only while it holds the database lease (scheduling.lease); a second
  beat stands by and takes over when the first dies;
- claims each occurrence before sending it: a `ScheduledRun` row unique per
  (schedule, occurrence), whose deterministic task id is the message's id. Two
  beats that both think they lead still send an occurrence once;
- computes cron schedules with scheduling.cron (DST policy there) and interval
  schedules on slots aligned to the Unix epoch, so every beat agrees on what "the
  occurrence" is;
- after downtime runs each task at most once for what it missed, or skips it
  (ScheduleOptions.missed_runs), never a burst;
- keeps every enabled schedule in memory (upstream leaves out crontabs whose hour
  is not near the current one, which would also hide the runs missed in a downtime).

Edits in the admin reach it within CELERY_BEAT_MAX_LOOP_INTERVAL seconds, through
django-celery-beat's change marker (PeriodicTasks).
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import logging
import math
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import schedules
from celery.beat import event_t
from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection, transaction
from django_celery_beat.models import PeriodicTask
from django_celery_beat.schedulers import SCHEDULE_SYNC_MAX_INTERVAL, DatabaseScheduler, ModelEntry

from config.sentry import beat_check_in_headers
from scheduling.cron import Cron
from scheduling.lease import Lease, process_name
from scheduling.models import MissedRuns, ScheduledRun, ScheduleOptions
from tasks.base import PermanentJobError

logger = logging.getLogger(__name__)

OCCURRENCE_HEADER = "x_schedule_occurrence"
_TASK_ID_NAMESPACE = uuid.UUID("7b0d3d8e-3c1a-4a55-9f0e-2f6c1b1d5a10")
_NEVER = 24 * 3600.0  # seconds to wait on a schedule that will not run again


def system_now() -> datetime:
    return datetime.now(UTC)


# Every "now" of the scheduler comes from here; tests drive beat through days with a
# clock of their own (tests/scheduling/beatdriver.py), nothing else is patched.
clock: Callable[[], datetime] = system_now


def current_time() -> datetime:
    return clock()


class CronSchedule(schedules.BaseSchedule):
    """A celery schedule backed by scheduling.cron.Cron: the DST policy is Cron's."""

    def __init__(self, cron: Cron) -> None:
        super().__init__()
        self.cron = cron

    def is_due(self, last_run_at: datetime) -> schedules.schedstate:
        now = current_time()
        following = self.cron.next_after(last_run_at)
        if following is None:
            return schedules.schedstate(False, _NEVER)
        if following > now:
            return schedules.schedstate(False, (following - now).total_seconds())
        after_this = self.cron.next_after(now)
        return schedules.schedstate(True, (after_this - now).total_seconds() if after_this else _NEVER)

    def occurrence(self, now: datetime) -> datetime:
        return self.cron.latest_at_or_before(now) or now

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CronSchedule) and other.cron == self.cron

    def __repr__(self) -> str:
        return f"<cron {self.cron.expression} {self.cron.zone.key}>"


class SlotSchedule(schedules.BaseSchedule):
    """Every N seconds, on slots counted from the Unix epoch: 6 h runs at 00:00, 06:00, ... UTC."""

    def __init__(self, every: timedelta) -> None:
        super().__init__()
        self.every = max(every.total_seconds(), 1.0)

    def _slot(self, moment: datetime) -> int:
        return math.floor(moment.timestamp() / self.every)

    def is_due(self, last_run_at: datetime) -> schedules.schedstate:
        now = current_time()
        slot = self._slot(now)
        until_next = (slot + 1) * self.every - now.timestamp()
        return schedules.schedstate(slot > self._slot(last_run_at), until_next)

    def occurrence(self, now: datetime) -> datetime:
        return datetime.fromtimestamp(self._slot(now) * self.every, UTC)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SlotSchedule) and other.every == self.every

    def __repr__(self) -> str:
        return f"<every {self.every:g} s>"


def schedule_of(model: PeriodicTask, fallback: Any) -> Any:
    if model.crontab_id is not None:
        return CronSchedule(Cron.of(model.crontab))
    if model.interval_id is not None:
        interval = model.interval
        return SlotSchedule(timedelta(**{interval.period: interval.every}))
    return fallback  # solar and clocked: upstream's


def missed_runs_policy(model: PeriodicTask) -> str:
    try:
        return str(model.schedule_options.missed_runs)
    except ScheduleOptions.DoesNotExist:
        return MissedRuns.RUN_ONCE


class OccurrenceEntry(ModelEntry):
    def __init__(self, model: PeriodicTask, app: Any = None) -> None:
        super().__init__(model, app=app)
        self.schedule: Any = schedule_of(model, self.schedule)
        self.missed_runs = missed_runs_policy(model)

    def _default_now(self) -> datetime:
        return current_time()

    def default_now(self) -> datetime:
        return current_time()

    def __next__(self) -> OccurrenceEntry:
        """The entry after this run: as upstream's, without building it again from the model (which
        parses its crontab and JSON fields again: a third of beat's time with 1,000 schedules due)."""
        self.model.last_run_at = self._default_now()
        self.model.total_run_count += 1
        self.model.no_changes = True
        following = object.__new__(type(self))  # (copy.copy goes through ScheduleEntry.__reduce__)
        following.__dict__.update(self.__dict__)
        following.last_run_at = self.model.last_run_at
        following.total_run_count = self.model.total_run_count
        return following

    def occurrence(self, now: datetime) -> datetime:
        """The nominal time of the run that is due at `now` (the latest one, if several were missed)."""
        if hasattr(self.schedule, "occurrence"):
            return self.schedule.occurrence(now)
        if self.model.clocked_id is not None:
            return self.model.clocked.clocked_time
        return now.replace(second=0, microsecond=0)  # solar: to the minute


def occurrence_task_id(name: str, occurrence: datetime) -> str:
    return str(uuid.uuid5(_TASK_ID_NAMESPACE, f"{name}\x00{occurrence.astimezone(UTC).isoformat()}"))


def claim(runs: list[ScheduledRun]) -> list[ScheduledRun]:
    """Inserts the runs in one statement; an occurrence already claimed (by this beat before, or by
    another that thinks it leads) is left out. The runs that were inserted get their pk; returns
    them. Raises DatabaseError when the database is away (then nothing is claimed)."""
    if not runs:
        return []
    meta = ScheduledRun._meta
    fields = [field for field in meta.concrete_fields if field.name != "id"]
    quote = connection.ops.quote_name
    rows = ", ".join(["(" + ", ".join(["%s"] * len(fields)) + ")"] * len(runs))
    params: list[Any] = []
    for run in runs:
        params.extend(field.get_db_prep_save(getattr(run, field.attname), connection) for field in fields)
    # Names from the model's metadata, quoted; every value is a parameter.
    columns = ", ".join(quote(str(field.column)) for field in fields)
    table, returning = quote(meta.db_table), f"{quote('id')}, {quote('schedule_name')}"
    sql = f"INSERT INTO {table} ({columns}) VALUES {rows} ON CONFLICT DO NOTHING RETURNING {returning}"  # noqa: S608
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql, params)
        inserted = {name: pk for pk, name in cursor.fetchall()}
    claimed = []
    for run in runs:
        if run.schedule_name in inserted:
            run.pk = inserted[run.schedule_name]
            claimed.append(run)
    return claimed


def publish(
    app: Any,
    entry: OccurrenceEntry,
    run: ScheduledRun,
    producer: Any = None,
    extra_headers: dict[str, Any] | None = None,
) -> Any:
    """Sends `entry`'s task as `run`, with the run's task id and occurrence header (and `extra_headers`)."""
    headers = {
        **entry.options.get("headers", {}),
        **(extra_headers or {}),
        "celery_beat_task": True,
        OCCURRENCE_HEADER: run.occurrence.astimezone(UTC).isoformat(),
    }
    options = {**entry.options, "headers": headers, "task_id": run.task_id}
    task = app.tasks.get(entry.task)
    if task is not None:
        return task.apply_async(entry.args, entry.kwargs, producer=producer, **options)
    return app.send_task(entry.task, entry.args, entry.kwargs, producer=producer, **options)


def run_now(app: Any, model: PeriodicTask) -> ScheduledRun:
    """Sends a periodic task at once, outside its schedule (the admin's "Run now")."""
    entry = OccurrenceEntry(model, app=app)
    moment = current_time()
    run = ScheduledRun(
        schedule_name=model.name,
        task=model.task,
        kind=ScheduledRun.Kind.MANUAL,
        occurrence=moment,
        dispatched_at=moment,
        task_id=str(uuid.uuid4()),
        beat="run now",
    )
    publish(app, entry, run)
    run.save()
    return run


class Scheduler(DatabaseScheduler):
    Entry = OccurrenceEntry

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.beat_name = process_name()
        lease_seconds = float(settings.SCHEDULES_LEASE_SECONDS)
        self.lease = Lease(duration=lease_seconds, renew_every=lease_seconds / 4)
        self._leading = False
        self._standing_by = False
        self._retry_publish_at = 0.0
        self._compared: Any = None
        self._changes_checked_at = 0.0
        self._database_down_since: float | None = None
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        try:
            super().setup_schedule()
        except DatabaseError as exc:
            # Beat starts anyway: the first tick after the database answers reads the schedules.
            self._database_away(exc)

    # --- which schedules ----------------------------------------------------------

    def install_default_entries(self, data: Any) -> None:
        """No `celery.backend_cleanup`: `default.cleanup` (a default schedule) expires results."""

    def enabled_models_qs(self) -> Any:
        soon = current_time() + timedelta(seconds=SCHEDULE_SYNC_MAX_INTERVAL)
        return (
            self.Model.objects.enabled()
            .exclude(clocked__isnull=False, clocked__clocked_time__gt=soon)
            .select_related("crontab", "interval", "solar", "clocked", "schedule_options")
        )

    # --- cheap ticks ---------------------------------------------------------------

    def schedules_equal(self, old_schedules: Any, new_schedules: Any) -> bool:
        """Upstream compares every entry field by field on every tick (O(n) per task sent).

        DatabaseScheduler builds a new dict whenever the database changed and flags it
        (`_heap_invalidated`), so the same dict object means the same schedules.
        """
        if not self._heap_invalidated and new_schedules is self._compared and old_schedules is not None:
            return True
        equal = bool(super().schedules_equal(old_schedules, new_schedules))
        self._compared = new_schedules
        return equal

    def schedule_changed(self) -> bool:
        """Asks the database at most once a second: a burst of sends is not a burst of queries."""
        now = current_time().timestamp()  # beat's clock, which tests move
        if abs(now - self._changes_checked_at) < 1.0:
            return False
        self._changes_checked_at = now
        return bool(super().schedule_changed())

    # --- one beat at a time -------------------------------------------------------

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if not self.lease.hold():
            if self._leading or not self._standing_by:
                logger.warning(
                    "beat %s: %s; standing by",
                    self.beat_name,
                    "lost the lease" if self._leading else "another beat holds the lease",
                )
                self._leading, self._standing_by = False, True
            return min(self.lease.renew_every, self.max_interval)
        self._standing_by = False
        if not self._leading:
            logger.info("beat %s: holds the lease; dispatching", self.beat_name)
            self._leading = True
            # Start from what the database says (last runs included), not from memory.
            self._initial_read = True
            self._heap = None
        wait = self._retry_publish_at - time.monotonic()
        if wait > 0:
            return min(wait, self.max_interval)
        try:
            interval = self._tick_due()
        except DatabaseError as exc:
            return self._database_away(exc)
        if self._database_down_since is not None:
            logger.warning(
                "beat %s: the database answers again after %.1f s; dispatching",
                self.beat_name,
                time.monotonic() - self._database_down_since,
            )
            self._database_down_since = None
        return interval

    def _database_away(self, exc: DatabaseError) -> float:
        """Beat outlives a database outage: it reads the schedules again once the database answers."""
        if self._database_down_since is None:
            self._database_down_since = time.monotonic()
            logger.error(
                "beat %s: the database is unreachable (%s); nothing is sent until it answers again",
                self.beat_name,
                type(exc).__name__,
            )
        with contextlib.suppress(Exception):  # a broken connection may fail to close; it is gone
            connection.close()
        self._initial_read = True
        self._heap = None
        return min(5.0, float(getattr(self, "max_interval", 5.0)))

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._leading:
                self.lease.release()
                self._leading = False

    # --- sending the occurrences due -------------------------------------------------

    def _tick_due(self) -> float:
        """Upstream's tick sends one entry per call (a claim, a commit and a publish each: 1,000
        schedules due in the same minute took 2.5 s). This takes every entry due now off the heap,
        claims them in one INSERT and publishes them in one pipelined batch (dispatch)."""
        if self._heap is None or not self.schedules_equal(self.old_schedulers, self.schedule):
            self.old_schedulers = copy.copy(self.schedule)
            self.populate_heap()
        heap = self._heap
        if not heap:
            return float(self.max_interval)
        due: list[tuple[Any, OccurrenceEntry, float]] = []
        later: list[Any] = []
        while heap:
            event = heap[0]
            entry = event[2]
            if event[0] > self._when(entry, 0):
                break
            heapq.heappop(heap)
            try:
                is_due, next_time_to_run = self.is_due(entry)
            except Exception:
                is_due, next_time_to_run = self._is_due_failed(entry)
            if is_due:
                due.append((event, entry, next_time_to_run))
            else:  # the heap said due, the entry asks for later (celery/celery#7649)
                delay = next_time_to_run if isinstance(next_time_to_run, int | float) else self.max_interval
                later.append(event_t(self._when(entry, delay), event[1], entry))
        for event in later:
            heapq.heappush(heap, event)
        if not due:
            if not heap:
                return float(self.max_interval)
            return float(min(heap[0][0] - self._when(heap[0][2], 0), self.max_interval))
        # Reserved first, as upstream does: a run that cannot be sent is put back (_try_again_later).
        # The next runs' times are taken now, not after sending (which takes a while for 1,000).
        following = []
        for event, entry, next_time_to_run in due:
            next_entry = self.reserve(entry)
            following.append(event_t(self._when(next_entry, next_time_to_run), event[1], next_entry))
        self.dispatch([entry for _, entry, _ in due])
        if self._heap is heap:  # not dropped by _try_again_later (rebuilt from the database then)
            for event in following:
                heapq.heappush(heap, event)
        return 0.0

    def apply_entry(self, entry: OccurrenceEntry, producer: Any = None) -> None:
        self.dispatch([entry], producer=producer)

    def dispatch(self, entries: list[OccurrenceEntry], producer: Any = None) -> None:
        """Claims each entry's occurrence and sends it: one INSERT for the claims (an occurrence
        another beat claimed first is left out), one pipelined publish for the messages."""
        now = current_time()
        runs: list[ScheduledRun] = []
        for entry in entries:
            occurrence = entry.occurrence(now)
            late = (now - occurrence).total_seconds()
            run = ScheduledRun(
                schedule_name=entry.name,
                task=entry.task,
                occurrence=occurrence,
                dispatched_at=now,
                task_id=occurrence_task_id(entry.name, occurrence),
                beat=self.beat_name,
            )
            if entry.missed_runs == MissedRuns.SKIP and late > settings.SCHEDULES_MISSED_RUN_GRACE_SECONDS:
                run.status, run.task_id = ScheduledRun.Status.SKIPPED, ""
                run.detail = f"missed: beat reached it {late:.0f} s after it was due; policy is skip"
            runs.append(run)
        try:
            claim(runs)  # the claim: unique per (schedule, occurrence)
        except DatabaseError:
            logger.exception("beat: could not record %d due run(s); trying again shortly", len(runs))
            for entry in entries:
                self._try_again_later(entry)
            return
        to_send: list[tuple[OccurrenceEntry, ScheduledRun]] = []
        for entry, run in zip(entries, runs, strict=True):
            if run.pk is None:
                logger.info(
                    "beat: %s due %s was already sent; not sending it again", entry.name, run.occurrence
                )
            elif run.status == ScheduledRun.Status.SKIPPED:
                logger.warning("beat: skipped %s due %s (%s)", entry.name, run.occurrence, run.detail)
            else:
                to_send.append((entry, run))
        try:
            self._publish_all(to_send, producer or self.producer, now)
        finally:
            self._tasks_since_sync += len(entries)
            if self.should_sync():
                self._do_sync()

    def _publish_all(
        self, to_send: list[tuple[OccurrenceEntry, ScheduledRun]], producer: Any, now: datetime
    ) -> None:
        refused: list[tuple[ScheduledRun, str]] = []
        sent: list[tuple[OccurrenceEntry, ScheduledRun]] = []
        try:
            with producer.batch(max_size=2 * len(to_send) + 8):
                for entry, run in to_send:
                    late = (now - run.occurrence).total_seconds()
                    logger.info(
                        "beat: sending %s (%s) due %s, %.3f s late",
                        entry.name,
                        entry.task,
                        run.occurrence,
                        late,
                    )
                    # sentry-sdk's Crons hook is upstream's apply_entry, which this one replaces.
                    monitoring = beat_check_in_headers(entry.name, entry.schedule)
                    try:
                        publish(self.app, entry, run, producer=producer, extra_headers=monitoring)
                    except PermanentJobError as exc:
                        logger.error("beat: %s refused: %s", entry.name, exc)
                        refused.append((run, str(exc)))
                    else:
                        sent.append((entry, run))
        except Exception:
            logger.exception(
                "beat: could not send %d due run(s) (%s, ...); trying again shortly",
                len(sent),
                sent[0][0].name if sent else "",
            )
            ScheduledRun.objects.filter(pk__in=[run.pk for _, run in sent]).delete()
            for entry, _ in sent:
                self._try_again_later(entry)
        for run, detail in refused:
            ScheduledRun.objects.filter(pk=run.pk).update(status=ScheduledRun.Status.REFUSED, detail=detail)

    def sync(self) -> None:
        """Writes the changed schedules' last run and run count: one UPDATE per distinct pair of
        values (schedules sent together share them), all in one transaction.

        Upstream reads and saves each one in a transaction of its own: with 1,000 schedules, seconds
        of commits in beat's loop, every few minutes. Only these two fields change here (the
        schedules' own fields are the admin's), and no signal is needed (`no_changes`)."""
        close_old_connections()
        names = list(self._dirty)
        groups: dict[tuple[Any, int], list[int]] = {}
        for name in names:
            entry = self._schedule.get(name)
            if entry is not None:
                key = (entry.model.last_run_at, entry.model.total_run_count)
                groups.setdefault(key, []).append(entry.model.pk)
        try:
            with transaction.atomic():
                for (last_run_at, total_run_count), pks in groups.items():
                    PeriodicTask.objects.filter(pk__in=pks).update(
                        last_run_at=last_run_at, total_run_count=total_run_count
                    )
        except DatabaseError as exc:
            logger.warning("beat: could not write the schedules' last runs (%s); trying again later", exc)
            return
        self._dirty.difference_update(names)

    def _try_again_later(self, entry: OccurrenceEntry) -> None:
        """Puts the occurrence back, so that it is sent when the broker (or database) answers again."""
        entry.model.last_run_at = entry.last_run_at
        entry.model.total_run_count = entry.total_run_count
        self._dirty.add(entry.name)
        self._initial_read = True  # rebuild entries and heap from the database
        self._heap = None
        self._retry_publish_at = time.monotonic() + min(5.0, self.max_interval)

    @property
    def info(self) -> str:
        return f"    . lease: {self.lease.holder} ({self.lease.duration:g} s)"
