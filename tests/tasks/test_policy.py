"""The shared task policy (tasks/base.py) without a worker: backoff, validation, masking."""

from __future__ import annotations

import random

import pytest

from tasks.base import InvalidArguments, JobTask, backoff_countdown, mask_value
from tests import probes


def test_backoff_ceiling_doubles_then_stops_at_the_cap() -> None:
    rng = random.Random(7)
    samples = {
        retry: [backoff_countdown(retry, base=2, maximum=60, rng=rng) for _ in range(500)]
        for retry in range(8)
    }

    for retry, waits in samples.items():
        ceiling = min(60, 2 * 2**retry)
        assert all(0 <= wait <= ceiling for wait in waits)
        # Full jitter: the waits cover the whole range, not one value.
        assert min(waits) < ceiling * 0.1 and max(waits) > ceiling * 0.9
    assert max(samples[7]) <= 60


def test_every_task_states_its_idempotency_and_uses_the_policy(celery_app) -> None:
    ours = {
        name: task
        for name, task in celery_app.tasks.items()
        if type(task).__module__.startswith(("tasks.", "jobs.", "monitoring."))
    }
    assert {"default.ping", "default.release_jobs", "email.send"} <= set(ours)
    for name, task in ours.items():
        assert isinstance(task, JobTask), f"{name} does not use JobTask"
        assert task.idempotency, f"{name} does not say how it is idempotent"
        assert task.schema is not None, f"{name} has no argument schema"


def test_attempts_default_to_five_and_tasks_can_lower_them() -> None:
    from tasks.email import send

    assert send.max_attempts == 5 and send.max_retries == 4
    assert probes.probe_flaky.max_attempts == 3 and probes.probe_flaky.max_retries == 2


def test_arguments_are_checked_again_when_the_task_starts() -> None:
    with pytest.raises(
        InvalidArguments, match="field 'fail_times': Input should be greater than or equal to 0"
    ):
        probes.probe_flaky(fail_times=-1)
    with pytest.raises(InvalidArguments, match="unexpected keyword argument 'nope'"):
        probes.probe_flaky(fail_times=1, nope=2)


def test_masked_values_keep_their_shape_but_not_their_content() -> None:
    assert mask_value(["ann@example.com", "token-123"]) == ["a***@e***.com", "***"]
    assert mask_value({"reset_link": "https://x/reset/abc"}) == {"reset_link": "***"}
