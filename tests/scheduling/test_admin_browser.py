"""The periodic-task admin in a real browser: log in, open a schedule, read its next runs, edit its cron.

Headless Chromium (tests/browser.py) against pytest-django's live server. Beat's clock
(`scheduling.beat.clock`, the one "now" of the scheduler and of the admin's next runs) is
fixed, so the next runs, DST mark included, are the same whatever day the suite runs.
Skipped when Chromium or Playwright is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest
from django_celery_beat.models import PeriodicTask

from scheduling import beat
from scheduling.defaults import crontab_for

if TYPE_CHECKING:
    from playwright.sync_api import Page  # type: ignore[import-not-found,unused-ignore]
    from pytest_django.live_server_helper import LiveServer

# The browser_page fixture. A test module may load a plugin (only non-root conftest files may not).
pytest_plugins = ["tests.browser"]

pytestmark = [pytest.mark.django_db(transaction=True)]

TASKS_URL = "/admin/django_celery_beat/periodictask/"
NAME = "browser: nightly report"
USERNAME, PASSWORD = "ops", "correct horse battery"
# Thu 2026-03-05 12:00 UTC: New York's clocks go forward on Sunday 2026-03-08 at 02:00,
# so a 02:30 run that day does not exist (it runs at 03:30, marked DST).
NOW = datetime(2026, 3, 5, 12, 0, tzinfo=UTC)


@pytest.fixture
def schedule(monkeypatch: pytest.MonkeyPatch, django_user_model: Any) -> PeriodicTask:
    """A superuser, a fixed beat clock and a schedule in New York at 02:30."""
    monkeypatch.setattr(beat, "clock", lambda: NOW)  # the live server runs in this process
    django_user_model.objects.create_superuser(USERNAME, "ops@example.com", PASSWORD)
    return PeriodicTask.objects.create(
        name=NAME,
        task="default.ping",
        crontab=crontab_for("30 2 * * *", "America/New_York"),
        description="opened by the browser test",
    )


@pytest.fixture
def admin_page(browser_page: Page, live_server: LiveServer, schedule: PeriodicTask) -> Iterator[Page]:
    """Logged in through the admin's own login form, on the periodic tasks list."""
    page = browser_page
    page.goto(f"{live_server.url}/admin/")
    page.fill("#id_username", USERNAME)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}/admin/")
    page.goto(f"{live_server.url}{TASKS_URL}")
    page.click(f"#result_list a:text-is('{NAME}')")
    page.wait_for_url(f"{live_server.url}{TASKS_URL}{schedule.pk}/change/")
    yield page


def test_next_runs_shown_and_cron_edited(admin_page: Page, live_server: LiveServer) -> None:
    from playwright.sync_api import expect  # type: ignore[import-not-found,unused-ignore]

    page = admin_page
    expect(page.locator(".field-in_words .readonly")).to_have_text("At 02:30")
    runs = page.locator("ul.next-runs > li")
    expect(runs).to_have_count(5)
    expect(runs.nth(0)).to_have_text("Fri 2026-03-06 02:30 EST (07:30 UTC)")
    expect(runs.nth(2)).to_contain_text("Sun 2026-03-08 03:30 EDT (07:30 UTC)")
    dst = page.locator("ul.next-runs strong.dst")
    expect(dst).to_have_count(1)
    expect(dst).to_have_text("DST: clocks go forward: 02:30 does not exist, runs at 03:30")
    expect(page.locator("#id_cron_expression")).to_have_value("30 2 * * *")
    expect(page.locator("#id_cron_timezone")).to_have_value("America/New_York")

    page.fill("#id_cron_expression", "15 3 * * *")
    page.click("input[name=_save]")
    page.wait_for_url(f"{live_server.url}{TASKS_URL}")
    message = page.locator(".messagelist .success")
    expect(message).to_contain_text(f"The periodic task “{NAME}: 15 3 * * *")  # str() names the schedule
    expect(message).to_contain_text("was changed successfully")

    task = PeriodicTask.objects.select_related("crontab").get(name=NAME)
    assert task.crontab is not None
    crontab = task.crontab
    assert (crontab.minute, crontab.hour, crontab.day_of_month, crontab.month_of_year) == (
        "15",
        "3",
        "*",
        "*",
    )
    assert crontab.day_of_week == "*"
    assert str(crontab.timezone) == "America/New_York"


def test_invalid_cron_shows_field_error_and_saves_nothing(
    admin_page: Page, schedule: PeriodicTask, live_server: LiveServer
) -> None:
    from playwright.sync_api import expect  # type: ignore[import-not-found,unused-ignore]

    page = admin_page
    change_url = page.url
    page.fill("#id_cron_expression", "61 * * * *")
    page.click("input[name=_save]")

    error = page.locator(".field-cron_expression .errorlist")
    expect(error).to_contain_text("minute")
    expect(error).to_contain_text("0-59")
    assert page.url == change_url
    expect(page.locator(".messagelist .success")).to_have_count(0)

    task = PeriodicTask.objects.select_related("crontab").get(pk=schedule.pk)
    assert task.crontab is not None
    assert (task.crontab.minute, task.crontab.hour) == ("30", "2")
    assert task.crontab_id == schedule.crontab_id


def test_the_change_page_selects_the_registered_task_and_lists_runs_beside_their_label(
    admin_page: Page, live_server: LiveServer, schedule: PeriodicTask
) -> None:
    page = admin_page
    page.goto(f"{live_server.url}{TASKS_URL}{schedule.pk}/change/")

    assert page.locator("#id_regtask").input_value() == "default.ping"
    runs = page.locator("ul.next-runs").bounding_box()
    field = page.locator("ul.next-runs").locator("xpath=..").bounding_box()
    assert runs is not None and field is not None
    # Not pushed 160 px right by the admin's rule for widget lists.
    assert runs["x"] - field["x"] < 30, (runs, field)
