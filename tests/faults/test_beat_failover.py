"""Two beats, the leader SIGKILLed: every occurrence of a schedule is sent exactly once.

The standby takes the lease over once the dead leader's lapses (scheduling.lease) and the
occurrence claims (ScheduledRun, unique per schedule and occurrence) keep a slot from being sent
twice. The messages are read back off the queue: what beat really sent. Slots that fell due
while no beat held the lease are run once for all of them (the `run_once` missed-runs policy),
never as a burst.
"""

from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path

import pytest
from celery import Celery
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from scheduling.models import ScheduledRun
from tests.conftest import BeatProcess
from tests.faults import oracle
from tests.scheduling.beatdriver import drain
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

EVERY = 2  # seconds between occurrences


def _runs_by(beat: BeatProcess) -> list[ScheduledRun]:
    return [run for run in ScheduledRun.objects.order_by("occurrence") if run.beat.endswith(beat.holder)]


def test_each_occurrence_is_sent_once_when_the_leading_beat_is_killed(
    celery_app: Celery, empty_queues: None, tmp_path: Path
) -> None:
    interval, _ = IntervalSchedule.objects.get_or_create(every=EVERY, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="heartbeat", task="default.ping", interval=interval)
    leader = BeatProcess("leader", tmp_path / "leader.log")
    beats = [leader]
    try:
        wait_for(lambda: leader.says("holds the lease; dispatching"), timeout=60, what="a leader")
        standby = BeatProcess("standby", tmp_path / "standby.log")
        beats.append(standby)
        wait_for(lambda: standby.says("standing by"), timeout=60, what="a standby")
        time.sleep(8)

        leader.stop(signal.SIGKILL)  # no clean shutdown: its lease has to lapse
        killed_at = time.monotonic()
        wait_for(lambda: _runs_by(standby), timeout=45, what="a run sent by the standby")
        takeover = time.monotonic() - killed_at
        time.sleep(8)
    finally:
        for beat in beats:
            beat.stop()
    logs = "\n".join(f"--- {beat.name} ---\n{beat.log.read_text()[-2000:]}" for beat in beats)

    occurrences = [run.occurrence for run in ScheduledRun.objects.filter(schedule_name="heartbeat")]
    occurrences.sort()
    sent = drain(celery_app)
    sent_occurrences = [message["occurrence"] for message in sent]
    claimed = {occurrence.isoformat() for occurrence in occurrences}
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(occurrences)]
    skipped_in_handover = int(max(gaps, default=EVERY) // EVERY) - 1
    result = oracle.Report(
        scenario="two beats, leader SIGKILLed",
        accepted=len(occurrences),
        completed=len(claimed & set(sent_occurrences)),
        not_final=len(claimed - set(sent_occurrences)),
        duplicate_executions=len(sent) - len({message["id"] for message in sent}),
        duplicate_effects=len(sent_occurrences)
        - len(set(sent_occurrences))
        + len(occurrences)
        - len(claimed)
        + len(set(sent_occurrences) - claimed),
        # Slots skipped while a beat held the lease (only the handover may skip any).
        missing_effects=sum(int(gap // EVERY) - 1 for gap in sorted(gaps)[:-1]),
        recovery_seconds=takeover,
    )
    result.record(f"{skipped_in_handover} slots fell due while no beat held the lease, sent once")
    assert result.perfect, result.line() + "\n" + logs
    assert result.duplicate_executions == 0, result.line()
    assert takeover < 30, result.line() + "\n" + logs
    assert _runs_by(leader) and _runs_by(standby), logs
