"""Two (then three) real `celery beat` processes against one database and broker.

Only one dispatches; the other stands by; when the leader is killed the standby
takes over within 30 s, and when it stops cleanly, at once. Every occurrence
reaches the broker exactly once: the messages are read back off the queue.
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
from tests.scheduling.beatdriver import drain
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def runs_by(beat: BeatProcess) -> list[ScheduledRun]:
    return [run for run in ScheduledRun.objects.order_by("occurrence") if run.beat.endswith(beat.holder)]


def test_two_beats_send_each_occurrence_once_and_the_standby_takes_over(
    celery_app: Celery, empty_queues: None, tmp_path: Path
) -> None:
    every_2s, _ = IntervalSchedule.objects.get_or_create(every=2, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="heartbeat", task="default.ping", interval=every_2s)
    first = BeatProcess("first", tmp_path / "first.log")
    beats = [first]
    try:
        wait_for(lambda: first.says("holds the lease; dispatching"), timeout=60)
        second = BeatProcess("second", tmp_path / "second.log")
        beats.append(second)
        wait_for(lambda: second.says("another beat holds the lease; standing by"), timeout=60)

        time.sleep(15)  # both running: only the first sends (the kill fault test covers longer runs)
        assert len(runs_by(first)) >= 6
        assert runs_by(second) == []

        first.stop(signal.SIGKILL)  # no clean shutdown: its lease has to lapse
        killed_at = time.monotonic()
        wait_for(lambda: runs_by(second), timeout=45, what="a run sent by the standby")
        takeover = time.monotonic() - killed_at
        assert takeover < 30, f"the standby took {takeover:.1f} s to take over"

        third = BeatProcess("third", tmp_path / "third.log")
        beats.append(third)
        wait_for(lambda: third.says("another beat holds the lease; standing by"), timeout=60)
        time.sleep(10)
        second.stop(signal.SIGTERM)  # a clean stop gives the lease up at once
        stopped_at = time.monotonic()
        wait_for(lambda: runs_by(third), timeout=20, what="a run sent by the third beat")
        assert time.monotonic() - stopped_at < 10
        time.sleep(6)
    finally:
        for beat in beats:
            beat.stop()
            print(f"--- {beat.name} ---\n{beat.log.read_text()[-4000:]}")  # shown when the test fails

    runs = list(ScheduledRun.objects.filter(schedule_name="heartbeat").order_by("occurrence"))
    occurrences = [run.occurrence for run in runs]
    assert len(occurrences) == len(set(occurrences))
    sent = drain(celery_app)
    assert sorted(message["occurrence"] for message in sent) == sorted(o.isoformat() for o in occurrences)
    assert len({message["id"] for message in sent}) == len(sent)
    # Each beat sent only while it led: their runs do not interleave.
    order = [next(b.name for b in beats if run.beat.endswith(b.holder)) for run in runs]
    assert order == sorted(order, key=["first", "second", "third"].index)
    assert set(order) == {"first", "second", "third"}
    # While a leader lived it missed no slot (2 s apart); the gaps are the two handovers.
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(occurrences)]
    assert sorted(gaps)[:-2] == [2.0] * (len(gaps) - 2)
