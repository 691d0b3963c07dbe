"""The admin metrics page and /metrics: who may see them, and what they show for known rows."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from tests.monitoring.conftest import add_metric_row

pytestmark = pytest.mark.django_db


def staff_client() -> Client:
    client = Client()
    client.force_login(User.objects.create_user("ops", password="pw", is_staff=True))
    return client


def add_row(minutes_ago: int, task: str, *, succeeded: int = 0, failed: int = 0, run: float = 0.2) -> None:
    add_metric_row(task, minutes_ago=minutes_ago, succeeded=succeeded, failed=failed, run=run)


def test_anonymous_and_non_staff_users_are_sent_to_the_login_page() -> None:
    assert Client().get("/admin/metrics/").status_code == 302
    client = Client()
    client.force_login(User.objects.create_user("someone", password="pw"))
    response = client.get("/admin/metrics/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_the_admin_index_links_to_the_metrics_page() -> None:
    assert 'href="/admin/metrics/"' in staff_client().get("/admin/").content.decode()


def test_the_window_decides_which_rows_count() -> None:
    add_row(5, "email.send", succeeded=40, failed=2, run=0.3)
    add_row(5 * 60, "email.send", succeeded=100)
    add_row(3 * 24 * 60, "images.process", succeeded=7)
    client = staff_client()

    hour = client.get("/admin/metrics/?window=1h").content.decode()
    day = client.get("/admin/metrics/?window=24h").content.decode()
    week = client.get("/admin/metrics/?window=7d").content.decode()

    assert 'id="total-finished">42<' in hour and 'id="total-failed">2<' in hour
    assert 'id="total-success-rate">95.2%<' in hour
    assert 'id="total-finished">142<' in day
    assert 'id="total-finished">149<' in week
    assert "SMTPServerDisconnected" in hour
    # p50 of 42 runs all in the 0.25-0.5 s bucket: interpolated inside it.
    row = hour.split('data-task="email.send"')[1].split("</tr>")[0]
    assert 'class="num finished">42<' in row and " ms</span> / " in row


def test_the_chart_has_one_bar_group_per_bin_with_the_counts() -> None:
    add_row(5, "email.send", succeeded=40, failed=2)
    page = staff_client().get("/admin/metrics/?window=1h").content.decode()

    assert page.count('<g class="bin"') == 60
    assert 'data-succeeded="40" data-failed="2"' in page
    assert "<svg" in page and "cdn" not in page.lower()


def test_an_unknown_window_falls_back_to_a_day() -> None:
    page = staff_client().get("/admin/metrics/?window=forever").content.decode()
    assert 'class="selected">last 24h<' in page


def test_every_queue_is_listed_even_with_no_worker_and_no_data() -> None:
    page = staff_client().get("/admin/metrics/").content.decode()
    for queue in ("email", "images", "data_sync", "analytics", "default"):
        assert f'data-queue="{queue}"' in page
    assert ">none<" in page  # no worker consumes it


def test_prometheus_endpoint_refuses_strangers_and_accepts_staff_and_the_token(settings) -> None:
    settings.METRICS_TOKEN = "s3cret-token"
    assert Client().get("/metrics").status_code == 401
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Basic s3cret-token").status_code == 401
    non_staff = Client()
    non_staff.force_login(User.objects.create_user("someone", password="pw"))
    assert non_staff.get("/metrics").status_code == 401

    scraped = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-token")
    assert scraped.status_code == 200
    names = {family.name for family in text_string_to_metric_families(scraped.content.decode())}
    assert {"jobs_tasks", "jobs_queue_messages", "jobs_dead_letters_waiting", "jobs_broker_up"} <= names
    assert staff_client().get("/metrics").status_code == 200


def test_an_empty_token_setting_lets_no_scraper_in(settings) -> None:
    settings.METRICS_TOKEN = ""
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 401


def test_the_tables_fit_the_window_wrapping_between_percentiles_and_scrolling_in_their_own_box() -> None:
    # Measured in a browser by tests/monitoring/test_page_browser.py (1,400 px); here, the markup.
    add_row(5, "email.send", succeeded=40, run=0.3)

    page = staff_client().get("/admin/metrics/?window=1h").content.decode()

    for table in ("queues", "tasks"):
        assert f'<div class="metrics-scroll">\n  <table class="metrics-table" id="{table}">' in page
    assert '<th class="num">Wait<br>p50 / p95 / p99</th>' in page
    assert 'id="nav-sidebar"' not in page  # the whole width for the tables
