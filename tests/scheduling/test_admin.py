"""The periodic-task admin through the Django test client posting the real forms."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from django.test import Client
from django_celery_beat.models import CrontabSchedule, PeriodicTask, PeriodicTasks
from django_celery_results.models import TaskResult

from scheduling import defaults
from scheduling.beat import Scheduler
from scheduling.cron import Cron
from scheduling.models import ScheduledRun
from tests.scheduling.beatdriver import Clock, add_cron, dispatched, run_until, utc

pytestmark = [pytest.mark.django_db(transaction=True)]

TASKS_URL = "/admin/django_celery_beat/periodictask/"


@pytest.fixture
def staff(client: Client, django_user_model: Any) -> Client:
    user = django_user_model.objects.create_superuser("ops", "ops@example.com", "correct horse battery")
    client.force_login(user)
    return client


@pytest.fixture
def scheduler(celery_app: Celery, empty_queues: None) -> Iterator[Scheduler]:
    beat = Scheduler(app=celery_app, max_interval=3600)
    yield beat
    beat.close()
    celery_app.control.purge()


def task_form(**overrides: Any) -> dict[str, Any]:
    """The add/change form as the browser posts it, missed-run inline included."""
    data = {
        "name": "report",
        "regtask": "default.ping",
        "task": "",
        "enabled": "on",
        "description": "",
        "cron_expression": "*/5 * * * *",
        "cron_timezone": "Europe/Berlin",
        "interval": "",
        "solar": "",
        "clocked": "",
        "start_time_0": "",
        "start_time_1": "",
        "args": "[]",
        "kwargs": "{}",
        "expires_0": "",
        "expires_1": "",
        "expire_seconds": "",
        "queue": "",
        "priority": "",
        "headers": "{}",
        "schedule_options-TOTAL_FORMS": "1",
        "schedule_options-INITIAL_FORMS": "0",
        "schedule_options-MIN_NUM_FORMS": "0",
        "schedule_options-MAX_NUM_FORMS": "1",
        "schedule_options-0-missed_runs": "run_once",
    }
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


def saved(response: Any) -> None:
    """Fails with the form's own errors when the admin did not accept the post."""
    if response.status_code != 302:
        context = response.context
        errors = [context["adminform"].form.errors] + [
            f.formset.errors for f in context["inline_admin_formsets"]
        ]
        raise AssertionError(f"not saved ({response.status_code}): {errors}")


def test_a_schedule_created_edited_and_disabled_in_the_admin_is_followed_by_beat(
    staff: Client, scheduler: Scheduler
) -> None:
    # The clock starts now: rows the admin writes carry real timestamps (date_changed).
    with Clock(datetime.now(UTC)) as clock:
        start = clock.now
        saved(staff.post(f"{TASKS_URL}add/", task_form()))
        task = PeriodicTask.objects.get(name="report")
        assert (task.task, task.crontab.minute, str(task.crontab.timezone)) == (
            "default.ping",
            "*/5",
            "Europe/Berlin",
        )
        run_until(scheduler, clock, start + timedelta(minutes=12))
        every_5 = Cron.parse("*/5 * * * *", "Europe/Berlin")
        assert dispatched("report") == list(every_5.iter_between(start, clock.now))
        assert len(dispatched("report")) >= 2

        edited = clock.now
        inline = {"schedule_options-INITIAL_FORMS": "1", "schedule_options-0-periodic_task": str(task.pk)}
        saved(staff.post(f"{TASKS_URL}{task.pk}/change/", task_form(cron_expression="*/2 * * * *", **inline)))
        run_until(scheduler, clock, edited + timedelta(minutes=5))
        every_2 = Cron.parse("*/2 * * * *", "Europe/Berlin")
        before_edit = len(list(every_5.iter_between(start, edited)))
        after_edit = dispatched("report")[before_edit:]
        expected = list(every_2.iter_between(edited, clock.now))
        catch_up = every_2.latest_at_or_before(edited)  # missed between the last run and the edit: run once
        if catch_up is not None and catch_up > dispatched("report")[before_edit - 1]:
            expected.insert(0, catch_up)
        assert after_edit == expected
        assert len(after_edit) >= 2

        disabled = task_form(cron_expression="*/2 * * * *", enabled=None, **inline)
        saved(staff.post(f"{TASKS_URL}{task.pk}/change/", disabled))
        run_until(scheduler, clock, clock.now + timedelta(minutes=20))
        assert dispatched("report")[before_edit:] == after_edit


def test_a_bulk_action_reaches_beat(staff: Client, scheduler: Scheduler) -> None:
    with Clock(datetime.now(UTC)) as clock:
        task = add_cron("minutely", "* * * * *")
        run_until(scheduler, clock, clock.now + timedelta(minutes=3))
        assert len(dispatched("minutely")) == 3

        before = PeriodicTasks.last_change()
        response = staff.post(TASKS_URL, {"action": "disable_tasks", "_selected_action": [task.pk]})
        assert response.status_code == 302
        assert PeriodicTasks.last_change() > before
        run_until(scheduler, clock, clock.now + timedelta(minutes=10))
        assert len(dispatched("minutely")) == 3

        staff.post(TASKS_URL, {"action": "toggle_tasks", "_selected_action": [task.pk]})
        enabled_again = clock.now
        run_until(scheduler, clock, clock.now + timedelta(minutes=3))
        resumed = dispatched("minutely")[3:]
        assert len(resumed) >= 3
        assert all(
            run > enabled_again - timedelta(minutes=1) for run in resumed
        )  # nothing from the disabled span


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("0 25 * * *", "hour &#x27;25&#x27; is not valid: Invalid end range: 25 &gt; 23. (valid: 0-23)"),
        ("61 * * * *", "minute &#x27;61&#x27; is not valid: Invalid end range: 61 &gt; 59. (valid: 0-59)"),
        ("0 0 * * 8", "(valid: 0-6 or sun-sat, Sunday is 0)"),
        ("0 0 31 2 *", "never runs"),
        ("0 0 * *", "it needs 5: minute hour day-of-month month day-of-week"),
    ],
)
def test_an_invalid_cron_field_is_refused_naming_the_field_and_its_range(
    staff: Client, expression: str, message: str
) -> None:
    response = staff.post(f"{TASKS_URL}add/", task_form(cron_expression=expression))

    assert response.status_code == 200
    assert message in response.content.decode()
    assert not PeriodicTask.objects.filter(name="report").exists()


def test_arguments_are_checked_against_the_tasks_schema_when_saved(staff: Client) -> None:
    response = staff.post(
        f"{TASKS_URL}add/", task_form(regtask="default.cleanup", kwargs='{"kinds": ["everything"]}')
    )

    assert response.status_code == 200
    assert "default.cleanup: invalid arguments: field &#x27;kinds.0&#x27;" in response.content.decode()
    saved(
        staff.post(f"{TASKS_URL}add/", task_form(regtask="default.cleanup", kwargs='{"kinds": ["events"]}'))
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        # A RecursionError (a 500) in the form's JSON check before.
        ("args", "[" * 1000 + "]" * 1000, "nests arrays and objects 1000 levels deep; at most 32"),
        ("kwargs", '{"a": ' + "[" * 1000 + "]" * 1000 + "}", "1001 levels deep; at most 32"),
        ("headers", '{"a": ' + "[" * 1000 + "]" * 1000 + "}", "1001 levels deep; at most 32"),
        # Not checked before: beat read them when it loaded the schedule.
        ("headers", "not json", "Unable to parse JSON"),
        ("headers", "[]", "must be a JSON object"),
    ],
)
def test_json_fields_nested_too_deep_or_malformed_are_refused_naming_the_problem(
    staff: Client, field: str, value: str, message: str
) -> None:
    response = staff.post(f"{TASKS_URL}add/", task_form(**{field: value}))

    assert response.status_code == 200
    assert message in response.content.decode()
    assert not PeriodicTask.objects.filter(name="report").exists()


def test_a_crontab_edited_on_its_own_page_is_checked_field_by_field(staff: Client) -> None:
    response = staff.post(
        "/admin/django_celery_beat/crontabschedule/add/",
        {
            "minute": "0",
            "hour": "9-25",
            "day_of_month": "*",
            "month_of_year": "*",
            "day_of_week": "*",
            "timezone": "UTC",
        },
    )

    assert response.status_code == 200
    assert response.context["adminform"].form.errors["hour"] == [
        "hour '9-25' is not valid: Invalid end range: 25 > 23. (valid: 0-23)"
    ]
    assert not CrontabSchedule.objects.filter(hour="9-25").exists()


def test_the_list_shows_cron_in_words_time_zone_next_and_last_run(staff: Client) -> None:
    with Clock(utc(2026, 11, 23, 9, 0, 0)):
        defaults.sync()
        ScheduledRun.objects.create(
            schedule_name="email: weekly newsletter",
            task="email.weekly_newsletter",
            occurrence=utc(2026, 11, 20, 10),
            dispatched_at=utc(2026, 11, 20, 10, 0, 0) + timedelta(milliseconds=3),
            task_id="run-1",
        )
        TaskResult.objects.create(task_id="run-1", status="SUCCESS")
        TaskResult.objects.filter(task_id="run-1").update(  # both are auto_now: set them after
            date_created=utc(2026, 11, 20, 10, 0, 1),
            date_done=utc(2026, 11, 20, 10, 0, 2) + timedelta(milliseconds=500),
        )
        page = staff.get(TASKS_URL).content.decode()

    assert "0 10 * * 5" in page and "At 10:00, only on Friday" in page
    assert "Fri 2026-11-27 10:00 UTC (10:00 UTC)" in page  # next run
    assert "2026-11-20 10:00:00 UTC · SUCCESS in 1.50 s" in page  # last run
    assert "At 02:00" in page and "never" in page  # the nightly roll-up has not run yet


def test_the_change_page_lists_the_next_five_runs_and_marks_a_dst_change(staff: Client) -> None:
    with Clock(utc(2026, 10, 29, 12)):
        task = add_cron("nightly", "30 1 * * *", "America/New_York")
        page = staff.get(f"{TASKS_URL}{task.pk}/change/").content.decode()

    runs = page.split('<ul class="next-runs">')[1].split("</ul>")[0]
    assert runs.count("<li>") == 5
    assert "Sat 2026-10-31 01:30 EDT (05:30 UTC)" in runs
    assert (
        'Sun 2026-11-01 01:30 EDT (05:30 UTC) <strong class="dst">DST: clocks go back: '
        "runs at the first of two 01:30 only</strong>"
    ) in runs
    assert "Mon 2026-11-02 01:30 EST (06:30 UTC)</li>" in runs


def test_run_now_sends_the_task_at_once(staff: Client, celery_worker: object, celery_app: Celery) -> None:
    task = add_cron("weekly", "0 10 * * 5")

    response = staff.post(TASKS_URL, {"action": "run_now", "_selected_action": [task.pk]}, follow=True)

    run = ScheduledRun.objects.get(schedule_name="weekly")
    assert run.kind == ScheduledRun.Kind.MANUAL
    assert f"Sent now: weekly (task id {run.task_id})" in response.content.decode()
    assert celery_app.AsyncResult(run.task_id).get(timeout=30)["pong"]


def test_a_missed_run_policy_edit_alone_reaches_beat(staff: Client) -> None:
    task = add_cron("weekly", "0 10 * * 5", missed_runs="run_once")
    before = PeriodicTasks.last_change()

    form = task_form(
        name="weekly",
        cron_expression="0 10 * * 5",
        cron_timezone="UTC",
        **{
            "schedule_options-INITIAL_FORMS": "1",
            "schedule_options-0-periodic_task": str(task.pk),
            "schedule_options-0-missed_runs": "skip",
        },
    )
    saved(staff.post(f"{TASKS_URL}{task.pk}/change/", form))

    assert task.schedule_options.__class__.objects.get(pk=task.pk).missed_runs == "skip"
    assert PeriodicTasks.last_change() > before


def test_anonymous_users_are_sent_to_the_login_page(client: Client) -> None:
    response = client.get(TASKS_URL)

    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_the_change_page_shows_our_task_as_the_registered_task(staff: Client) -> None:
    task = add_cron("pinger", "*/5 * * * *", "UTC")  # default.ping

    page = staff.get(f"{TASKS_URL}{task.pk}/change/").content.decode()

    select = page.split('name="regtask"')[1].split("</select>")[0]
    assert '<option value="default.ping" selected>default.ping</option>' in select
    for name in ("email.send", "images.process", "data_sync.sync", "analytics.aggregate_daily"):
        assert f'<option value="{name}">' in select
    assert "celery." not in select


def test_the_next_runs_list_is_not_indented_as_a_form_list(staff: Client) -> None:
    # Django's admin CSS indents every <ul> in an aligned form by 160 px (meant for widgets):
    # the next and recent runs, in read-only fields, undo it (scheduling/static/scheduling/admin.css).
    task = add_cron("pinger", "*/5 * * * *", "UTC")

    page = staff.get(f"{TASKS_URL}{task.pk}/change/").content.decode()

    assert "scheduling/admin.css" in page
    css = staff.get("/static/scheduling/admin.css")
    assert css.status_code == 200
    rules = css.getvalue().decode()
    assert "ul.next-runs" in rules and "margin-left: 0" in rules
