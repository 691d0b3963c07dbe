"""The metrics page in a real browser: log in, open it from the admin index, read numbers and charts.

Headless Chromium (tests/browser.py) against pytest-django's live server. The screenshot is
kept as a test artifact in $TEST_ARTIFACTS_DIR (default: test-artifacts/ at the top).
Skipped when Chromium or Playwright is missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.monitoring.conftest import add_metric_row

if TYPE_CHECKING:
    from playwright.sync_api import Page  # type: ignore[import-not-found,unused-ignore]
    from pytest_django.live_server_helper import LiveServer

pytest_plugins = ["tests.browser"]

pytestmark = [pytest.mark.django_db(transaction=True)]

USERNAME, PASSWORD = "ops", "correct horse battery"
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", Path(__file__).resolve().parents[2] / "test-artifacts"))


def test_the_metrics_page_shows_numbers_and_charts(
    browser_page: Page, live_server: LiveServer, django_user_model: Any, settings
) -> None:
    from playwright.sync_api import expect  # type: ignore[import-not-found,unused-ignore]

    django_user_model.objects.create_superuser(USERNAME, "ops@example.com", PASSWORD)
    for minutes_ago, ok, failed in ((50, 30, 0), (20, 12, 3), (5, 18, 1)):
        add_metric_row("email.send", minutes_ago=minutes_ago, succeeded=ok, failed=failed, run=0.3)

    page = browser_page
    page.goto(f"{live_server.url}/admin/")
    page.fill("#id_username", USERNAME)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.click("#monitoring-links a:text-is('Task metrics')")
    page.wait_for_url(f"{live_server.url}/admin/metrics/")
    page.click("a:text-is('last 1h')")

    expect(page.locator("#total-finished")).to_have_text("64")
    expect(page.locator("#total-failed")).to_have_text("4")
    expect(page.locator("#total-success-rate")).to_have_text("93.8%")
    expect(page.locator("#tasks tr[data-task='email.send'] .finished")).to_have_text("64")
    expect(page.locator("#exceptions")).to_contain_text("SMTPServerDisconnected")
    expect(page.locator("#queues tr[data-queue]")).to_have_count(5)
    chart = page.locator("svg.metrics-chart")
    expect(chart).to_be_visible()
    box = chart.bounding_box()
    assert box is not None and box["width"] > 300
    # Three bins with bars: red ones where tasks failed.
    expect(chart.locator("g.bin rect[fill='#2e7d32']")).to_have_count(3)
    expect(chart.locator("g.bin rect[fill='#c62828']")).to_have_count(2)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "metrics-page.png"), full_page=True)
    assert (ARTIFACTS / "metrics-page.png").stat().st_size > 10_000


def test_the_metrics_page_fits_a_1400_pixel_window_with_dated_chart_labels(
    browser_page: Page, live_server: LiveServer, django_user_model: Any, settings
) -> None:
    settings.METRICS_INSPECT_TIMEOUT = 0.2
    django_user_model.objects.create_superuser(USERNAME, "ops@example.com", PASSWORD)
    add_metric_row("email.send", minutes_ago=30, succeeded=30, failed=1, run=12.5)

    page = browser_page
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(f"{live_server.url}/admin/login/?next=/admin/metrics/")
    page.fill("#id_username", USERNAME)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}/admin/metrics/")

    assert page.evaluate("document.documentElement.scrollWidth") <= 1400
    for table in ("#queues", "#tasks"):
        box = page.locator(table).bounding_box()
        assert box is not None and box["x"] + box["width"] <= 1400, (table, box)
    ticks = page.locator("svg.metrics-chart text.tick").all_text_contents()  # SVG has no innerText
    assert len(ticks) == 5 and all(len(tick.split()) >= 3 for tick in ticks), ticks  # "Nov 27 14:40"
