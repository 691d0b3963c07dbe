"""The shared task policy (tasks/base.py) without a worker: backoff, validation, masking."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tasks import retries
from tasks.base import InvalidArguments, JobTask, TransientJobError, asked_wait, mask_value
from tasks.retries import RetryPolicy
from tests import probes


def test_the_wait_grows_to_the_cap_with_equal_jitter() -> None:
    rng = random.Random(7)
    policy = RetryPolicy(attempts=10, base=2, cap=60)
    samples = {retry: [policy.wait(retry, rng=rng) for _ in range(500)] for retry in range(9)}

    for retry, waits in samples.items():
        ceiling = min(60, 2 * 2**retry)
        # Equal jitter: never less than half the ceiling, and spread over the other half.
        assert all(ceiling / 2 <= wait <= ceiling for wait in waits)
        assert min(waits) < ceiling * 0.55 and max(waits) > ceiling * 0.95
    assert max(samples[8]) <= 60


def test_a_wait_asked_for_is_honoured_up_to_the_cap() -> None:
    policy = RetryPolicy(attempts=5, base=2, cap=600)

    assert policy.wait(0, retry_after=300) == 300
    assert policy.wait(0, retry_after=5000) == 600
    assert 1 <= policy.wait(0, retry_after=0.5) <= 2  # asking for less than the backoff changes nothing


def test_each_family_rides_out_its_outage_within_a_known_window() -> None:
    windows = {family: retries.configured(family).window() for family in retries.SETTINGS}

    # (least, most) seconds from the first failure to the last attempt: the README's table.
    assert windows == {
        "default": (307.5, 615.0),
        "email": (3635.0, 7270.0),
        "data_sync": (1985.0, 3970.0),
        "analytics": (1837.5, 3675.0),
        "images": (75.0, 150.0),
    }
    # Email rides out an hour of its SMTP relay; data sync and analytics half an hour.
    assert windows["email"][0] >= 3600
    assert min(windows["data_sync"][0], windows["analytics"][0]) >= 1800
    assert retries.describe_window(retries.configured("email")) == "at least 1 h 0 min, at most 2 h 1 min"


def test_tasks_get_their_familys_policy_unless_they_say_otherwise() -> None:
    from tasks.analytics import aggregate_daily
    from tasks.email import send
    from tasks.images import process as process_image

    assert send.policy == retries.FAMILY_POLICIES["email"] and send.max_retries == 12
    assert aggregate_daily.policy == retries.FAMILY_POLICIES["analytics"]
    assert process_image.policy.attempts == 5
    assert probes.probe_flaky.policy == RetryPolicy(attempts=3, base=5, cap=300)  # max_attempts=3
    assert probes.probe_flaky.max_retries == 2


def test_a_setting_replaces_a_familys_policy(settings) -> None:
    settings.JOBS_RETRY_IMAGES = (2, 1.0, 30.0)

    assert retries.configured("images") == RetryPolicy(attempts=2, base=1, cap=30)
    assert retries.configured("email") == retries.FAMILY_POLICIES["email"]


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


def test_the_readme_and_the_tasks_page_state_each_familys_window() -> None:
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    page = (root / "docs" / "tasks.md").read_text()

    for family in retries.SETTINGS:
        policy = retries.configured(family)
        row = f"| {policy.attempts} | {retries.describe_window(policy)} |"
        assert row in readme, f"README.md: {family}'s row should end {row}"
        assert retries.describe_window(policy) in page, f"docs/tasks.md: {family}'s window"


def test_a_wait_asked_for_is_found_on_the_error_a_task_wrapped() -> None:
    class Upstream(Exception):
        retry_after = 120

    try:
        try:
            raise Upstream("503 maintenance")
        except Upstream as cause:
            raise TransientJobError("the source is away") from cause
    except TransientJobError as error:
        assert asked_wait(error) == 120
    assert asked_wait(TransientJobError("busy", retry_after=30)) == 30
    assert asked_wait(TransientJobError("busy")) is None
