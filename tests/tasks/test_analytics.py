"""The analytics services, called directly: ingestion, local days, the roll-up, the report.

Runs on SQLite or PostgreSQL, whichever DATABASE_URL names: the roll-up is SQL
(GROUP BY, COUNT DISTINCT with a filter, an upsert) and must give the same rows on both.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth import get_user_model
from django.core import mail
from django.core.mail import EmailMultiAlternatives
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tasks.analytics import aggregate_daily, backfill, daily_report, ingest
from tasks.base import InvalidArguments, PermanentJobError, TransientJobError
from tasks.models import DailyMetric, EmailLog, Event, EventBatch
from tasks.services import analytics as service
from tests.smtp import SmtpServer

pytestmark = pytest.mark.django_db

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def event(name: str, at: datetime, user: str = "", **properties: Any) -> dict[str, Any]:
    return {"name": name, "user_id": user, "timestamp": at.isoformat(), "properties": properties}


def metric_rows(day: date | None = None) -> set[tuple[Any, ...]]:
    """Every DailyMetric row (of one day), ids and computation times aside."""
    rows = DailyMetric.objects.all() if day is None else DailyMetric.objects.filter(day=day)
    return set(rows.values_list("day", "event_name", "count", "distinct_users"))


# --- ingestion --------------------------------------------------------------------


def test_ingest_stores_valid_events_in_chunks_of_the_given_size() -> None:
    at = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    events = [
        event("page_view", at + timedelta(seconds=i), user=f"u{i % 3}", page=f"/p/{i}") for i in range(25)
    ]

    with CaptureQueriesContext(connection) as queries:
        stored = service.ingest_events(events, chunk_size=10)

    inserts = [q for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("INSERT")]
    assert stored == 25
    assert len(inserts) == 3  # 10 + 10 + 5
    assert Event.objects.count() == 25
    first = Event.objects.order_by("timestamp").first()
    assert first is not None
    assert (first.name, first.user_id, first.properties, first.timestamp) == (
        "page_view",
        "u0",
        {"page": "/p/0"},
        at,
    )


def test_ingest_takes_any_iterable_and_normalises_fields() -> None:
    def produced() -> Any:
        yield {"name": "  signup ", "user_id": 42, "timestamp": "2026-05-04T10:00:00+02:00"}

    assert service.ingest_events(produced()) == 1

    stored = Event.objects.get()
    assert (stored.name, stored.user_id, stored.properties) == ("signup", "42", {})
    assert stored.timestamp == datetime(2026, 5, 4, 8, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"name": "x"}, "event 1: field 'timestamp': Field required"),
        (
            {"name": "x", "timestamp": "2026-05-04T10:00:00"},
            "event 1: field 'timestamp': Input should have timezone",
        ),
        (
            {"name": "x", "timestamp": "yesterday"},
            "event 1: field 'timestamp': Input should be a valid datetime",
        ),
        (
            {"name": "", "timestamp": "2026-05-04T10:00:00Z"},
            "event 1: field 'name': String should have at least 1",
        ),
        (
            {"name": "n" * 101, "timestamp": "2026-05-04T10:00:00Z"},
            "event 1: field 'name': String should have at most",
        ),
        (
            {"name": "a\nb", "timestamp": "2026-05-04T10:00:00Z"},
            "event 1: field 'name': must not contain control",
        ),
        (
            {"name": "x", "timestamp": "2026-05-04T10:00:00Z", "usr": "1"},
            "event 1: field 'usr': Extra inputs",
        ),
        (
            {"name": "x", "timestamp": "2026-05-04T10:00:00Z", "properties": []},
            "event 1: field 'properties': Input should",
        ),
        (
            {"name": "x", "timestamp": "2026-05-04T10:00:00Z", "properties": {"blob": "x" * 20_000}},
            "event 1: field 'properties': is 20011 bytes as JSON; at most 16384",
        ),
        ("not an object", "event 1: Input should be a valid dictionary"),
    ],
)
def test_a_bad_event_is_refused_with_its_index_and_field_and_nothing_is_stored(
    bad: Any, message: str
) -> None:
    good = event("ok", datetime(2026, 5, 4, tzinfo=UTC))

    with pytest.raises(service.InvalidEvent) as raised:
        service.ingest_events([good, bad, good], chunk_size=1)

    assert str(raised.value).startswith(message)
    assert not Event.objects.exists()


def test_properties_must_be_json_values() -> None:
    with pytest.raises(service.InvalidEvent, match="field 'properties': must hold JSON values only"):
        service.ingest_events([{"name": "x", "timestamp": timezone.now(), "properties": {"at": object()}}])


def test_a_batch_key_stores_a_batch_once_however_often_it_is_sent() -> None:
    events = [event("click", datetime(2026, 5, 4, tzinfo=UTC), user="u1") for _ in range(3)]

    first = service.ingest_events(events, batch_key="producer-7:batch-1")
    second = service.ingest_events(events, batch_key="producer-7:batch-1")
    other = service.ingest_events(events, batch_key="producer-7:batch-2")

    assert (first, second, other) == (3, 3, 3)
    assert Event.objects.count() == 6
    assert EventBatch.objects.get(key="producer-7:batch-1").events == 3


def test_a_refused_batch_does_not_keep_its_key() -> None:
    with pytest.raises(service.InvalidEvent):
        service.ingest_events([{"name": "x"}], batch_key="k")

    assert not EventBatch.objects.exists()
    assert service.ingest_events([event("x", datetime(2026, 5, 4, tzinfo=UTC))], batch_key="k") == 1


def test_the_ingest_task_checks_events_when_sent() -> None:
    expected = r"field 'events': event 1: field 'timestamp': Input should have timezone"
    with pytest.raises(InvalidArguments, match=expected):
        ingest.delay(events=[event("a", timezone.now()), {"name": "b", "timestamp": "2026-05-04T10:00:00"}])
    with pytest.raises(InvalidArguments, match="field 'events': List should have at most 10000 items"):
        ingest.delay(events=[event("a", timezone.now())] * 10_001)
    with pytest.raises(InvalidArguments, match="field 'events': List should have at least 1 item"):
        ingest.delay(events=[])


# --- local days -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "day", "hours"),
    [
        ("Europe/Berlin", date(2026, 3, 29), 23),  # clocks go forward
        ("Europe/Berlin", date(2026, 10, 25), 25),  # clocks go back
        ("Europe/Berlin", date(2026, 6, 1), 24),
        ("America/New_York", date(2026, 3, 8), 23),
        ("America/New_York", date(2026, 11, 1), 25),
        ("UTC", date(2026, 3, 29), 24),
    ],
)
def test_a_local_day_lasts_from_midnight_to_midnight(settings, zone: str, day: date, hours: int) -> None:
    settings.TIME_ZONE = zone

    start, end = service.day_bounds(day)

    assert (end - start) == timedelta(hours=hours)
    assert start.astimezone(ZoneInfo(zone)).hour == 0 == end.astimezone(ZoneInfo(zone)).hour
    assert service.day_bounds(day + timedelta(days=1))[0] == end


def test_yesterday_is_the_local_yesterday(settings) -> None:
    settings.TIME_ZONE = "America/New_York"
    # 02:00 UTC on 4 May is still 3 May in New York.
    assert service.yesterday(datetime(2026, 5, 4, 2, 0, tzinfo=UTC)) == date(2026, 5, 2)
    settings.TIME_ZONE = "Europe/Berlin"
    assert service.yesterday(datetime(2026, 5, 3, 23, 0, tzinfo=UTC)) == date(2026, 5, 3)


def test_backfill_ranges_are_inclusive_ordered_and_bounded() -> None:
    assert service.days_between(date(2026, 2, 27), date(2026, 3, 1)) == [
        date(2026, 2, 27),
        date(2026, 2, 28),
        date(2026, 3, 1),
    ]
    assert len(service.days_between(date(2024, 1, 1), date(2024, 12, 31))) == 366
    with pytest.raises(ValueError, match="start 2026-03-02 is after end 2026-03-01"):
        service.days_between(date(2026, 3, 2), date(2026, 3, 1))
    with pytest.raises(ValueError, match="is 367 days; at most 366"):
        service.days_between(date(2025, 1, 1), date(2026, 1, 2))


def test_day_arguments_are_checked_when_sent() -> None:
    with pytest.raises(InvalidArguments, match="field 'day': '2026-02-30' is not a calendar date"):
        aggregate_daily.delay(day="2026-02-30")
    with pytest.raises(InvalidArguments, match="field 'day': must be a date as YYYY-MM-DD, not '3/1/2026'"):
        daily_report.delay(day="3/1/2026")
    with pytest.raises(InvalidArguments, match="start 2026-03-02 is after end 2026-03-01"):
        backfill.delay(start="2026-03-02", end="2026-03-01")
    with pytest.raises(InvalidArguments, match="is 731 days; at most 366"):
        backfill.delay(start="2024-01-01", end="2025-12-31")


# --- the roll-up ------------------------------------------------------------------


def berlin(year: int, month: int, day: int, hour: int, minute: int, second: int) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=BERLIN)


@pytest.fixture
def dst_day_events(settings) -> date:
    """Events around 29 March 2026 in Berlin, the 23-hour day the clocks go forward (02:00 -> 03:00)."""
    settings.TIME_ZONE = "Europe/Berlin"
    service.ingest_events(
        [
            event("page_view", berlin(2026, 3, 28, 23, 59, 59), user="before-midnight"),  # the day before
            event("page_view", berlin(2026, 3, 29, 0, 0, 0), user="ann"),  # 28 March 23:00 UTC
            event("page_view", berlin(2026, 3, 29, 1, 59, 59), user="ann"),
            event("page_view", berlin(2026, 3, 29, 3, 0, 0), user="bob"),  # first instant after the jump
            event("page_view", berlin(2026, 3, 29, 12, 0, 0)),  # anonymous: an event, not a user
            event("signup", berlin(2026, 3, 29, 23, 59, 59), user="bob"),  # 21:59:59 UTC
            event("signup", berlin(2026, 3, 30, 0, 0, 0), user="cy"),  # 22:00 UTC on the 29th: the next day
            event("purchase", datetime(2026, 3, 29, 22, 30, tzinfo=UTC), user="dee"),  # 00:30 on the 30th
        ]
    )
    return date(2026, 3, 29)


def test_a_day_rolls_up_to_exact_counts_and_distinct_users_in_local_time(dst_day_events: date) -> None:
    result = service.aggregate_day(dst_day_events)

    assert metric_rows() == {
        (date(2026, 3, 29), "page_view", 4, 2),
        (date(2026, 3, 29), "signup", 1, 1),
    }
    assert result == {"day": "2026-03-29", "event_names": 2, "events": 5, "removed": 0}

    service.aggregate_day(date(2026, 3, 28))
    service.aggregate_day(date(2026, 3, 30))
    assert metric_rows(date(2026, 3, 28)) == {(date(2026, 3, 28), "page_view", 1, 1)}
    assert metric_rows(date(2026, 3, 30)) == {
        (date(2026, 3, 30), "signup", 1, 1),
        (date(2026, 3, 30), "purchase", 1, 1),
    }


def test_the_long_autumn_day_takes_all_25_hours(settings) -> None:
    settings.TIME_ZONE = "America/New_York"
    day = date(2026, 11, 1)
    start, end = service.day_bounds(day)
    service.ingest_events(
        [
            event("tick", start, user="a"),
            event("tick", start + timedelta(hours=1, minutes=30), user="b"),  # 01:30 EDT
            event("tick", start + timedelta(hours=2, minutes=30), user="b"),  # 01:30 EST, an hour later
            event("tick", start + timedelta(hours=24, minutes=30), user="b"),  # 23:30 EST
            event("tick", end - timedelta(microseconds=1), user="c"),
            event("tick", end, user="d"),
        ]
    )

    service.aggregate_day(day)

    assert metric_rows() == {(day, "tick", 5, 3)}


def test_running_the_roll_up_twice_gives_the_same_rows(dst_day_events: date) -> None:
    service.aggregate_day(dst_day_events)
    first = metric_rows()
    ids = set(DailyMetric.objects.values_list("id", flat=True))

    service.aggregate_day(dst_day_events)

    assert metric_rows() == first
    assert set(DailyMetric.objects.values_list("id", flat=True)) == ids  # updated in place


def test_names_whose_events_are_gone_disappear_on_the_next_run(dst_day_events: date) -> None:
    service.aggregate_day(dst_day_events)
    Event.objects.filter(name="signup").delete()
    Event.objects.filter(name="page_view", user_id="ann").delete()

    result = service.aggregate_day(dst_day_events)

    assert metric_rows(dst_day_events) == {(dst_day_events, "page_view", 2, 1)}
    assert result["removed"] == 1


def test_a_day_without_events_ends_with_no_rows(dst_day_events: date) -> None:
    service.aggregate_day(dst_day_events)
    Event.objects.all().delete()

    assert service.aggregate_day(dst_day_events) == {
        "day": "2026-03-29",
        "event_names": 0,
        "events": 0,
        "removed": 2,
    }
    assert not DailyMetric.objects.exists()


def test_a_day_past_the_event_retention_is_not_recomputed(settings) -> None:
    settings.ANALYTICS_EVENT_RETENTION_DAYS = 30
    old_day = service.local_today() - timedelta(days=40)
    DailyMetric.objects.create(day=old_day, event_name="kept", count=9, distinct_users=3)

    with pytest.raises(ValueError, match="may already be deleted"):
        service.aggregate_day(old_day)

    assert metric_rows() == {(old_day, "kept", 9, 3)}
    assert service.is_recomputable(service.local_today() - timedelta(days=29))


# --- the report -------------------------------------------------------------------


def make_metrics(day: date, **counts: tuple[int, int]) -> None:
    for name, (count, users) in counts.items():
        DailyMetric.objects.create(day=day, event_name=name, count=count, distinct_users=users)


def test_the_report_lists_the_busiest_names_with_the_change_since_the_day_before(settings) -> None:
    settings.ANALYTICS_REPORT_TOP_N = 3
    day = date(2026, 5, 3)
    make_metrics(day - timedelta(days=1), page_view=(80, 20), signup=(10, 10), gone=(5, 1))
    make_metrics(day, page_view=(100, 25), signup=(5, 5), purchase=(7, 3), rare=(1, 1))

    report = service.build_daily_report(day)

    assert (report.total_events, report.previous_total_events, report.change) == (113, 95, "+18 (+18.9%)")
    assert [(line.event_name, line.count, line.distinct_users, line.change) for line in report.top] == [
        ("page_view", 100, 25, "+20 (+25.0%)"),
        ("purchase", 7, 3, "new"),
        ("signup", 5, 5, "-5 (-50.0%)"),
    ]
    assert report.names_not_shown == 1


def test_the_report_escapes_names_in_html_but_not_in_text() -> None:
    day = date(2026, 5, 3)
    make_metrics(day, **{"<b>&co": (3, 2)})

    subject, text, html = service.render_daily_report(service.build_daily_report(day))

    assert subject == "Analytics 2026-05-03: 3 events (new vs 2026-05-02)"
    assert "- <b>&co: 3 events, 2 distinct users (new vs 0)" in text
    assert "&lt;b&gt;&amp;co" in html and "<b>&co" not in html


def test_recipients_are_active_staff_with_an_address_and_the_admins_each_once(settings) -> None:
    users = get_user_model().objects
    users.create_user("ann", "Ann@Example.com", is_staff=True)
    users.create_user("bob", "bob@example.com", is_staff=True, is_active=False)
    users.create_user("cy", "cy@example.com")
    users.create_user("dee", "", is_staff=True)
    settings.ADMINS = [("Ops", "ops@example.com"), ("Ann again", "ann@example.com")]

    assert service.report_recipients() == ["Ann@example.com", "ops@example.com"]


def test_the_report_goes_to_each_recipient_once_with_text_and_html(settings, dst_day_events: date) -> None:
    get_user_model().objects.create_user("ann", "ann@example.com", is_staff=True)
    settings.ADMINS = [("Ops", "ops@example.com")]

    first = service.send_daily_report(dst_day_events)
    second = service.send_daily_report(dst_day_events)

    assert first == {"day": "2026-03-29", "recipients": 2, "sent": 2, "already_sent": 0, "failed": 0}
    assert second == {**first, "sent": 0, "already_sent": 2}
    assert sorted(m.to[0] for m in mail.outbox) == ["ann@example.com", "ops@example.com"]
    message = mail.outbox[0]
    assert isinstance(message, EmailMultiAlternatives)
    assert message.alternatives[0][1] == "text/html"
    assert "page_view: 4 events, 2 distinct users" in str(message.body)
    # It rolled the day up first.
    assert metric_rows(dst_day_events) == {
        (dst_day_events, "page_view", 4, 2),
        (dst_day_events, "signup", 1, 1),
    }


def test_no_recipients_is_not_an_error() -> None:
    assert service.send_daily_report(date(2026, 5, 3))["recipients"] == 0
    assert not mail.outbox


def test_a_busy_server_is_transient_and_a_retry_skips_who_has_the_report(settings) -> None:
    settings.ADMINS = [("A", "a@example.com"), ("B", "b@example.com")]
    day = date(2026, 5, 3)
    with SmtpServer() as smtp:
        for name, value in smtp.django_settings().items():
            setattr(settings, name, value)
        smtp.set_failure(rcpt=(451, "4.3.2 try again later"), times=1)
        # The first RCPT (for a@) is refused: nobody has it yet.
        with pytest.raises(TransientJobError, match="451"):
            service.send_daily_report(day)
        assert EmailLog.objects.get(recipient="a@example.com").status == "pending"

        assert service.send_daily_report(day)["sent"] == 2
        smtp.wait_for_messages(2)
        assert service.send_daily_report(day)["already_sent"] == 2
        assert len(smtp.messages) == 2


def test_a_refused_recipient_fails_for_good_after_the_others_got_it(settings, caplog) -> None:
    settings.ADMINS = [("A", "a@example.com"), ("B", "b@example.com"), ("C", "c@example.com")]
    day = date(2026, 5, 3)
    with SmtpServer() as smtp:
        for name, value in smtp.django_settings().items():
            setattr(settings, name, value)
        smtp.set_failure(rcpt=(550, "5.1.1 no such user"), times=1)

        with pytest.raises(PermanentJobError, match=r"1 of 3 recipient\(s\) refused for good"):
            service.send_daily_report(day)

        assert sorted(m.envelope_to[0] for m in smtp.wait_for_messages(2)) == [
            "b@example.com",
            "c@example.com",
        ]
        assert EmailLog.objects.get(recipient="a@example.com").status == "failed"
        # Replayed once the address is fixed: only the one who missed it gets it.
        assert service.send_daily_report(day)["sent"] == 1
        assert [m.envelope_to for m in smtp.wait_for_messages(3)][-1] == ["a@example.com"]
    ours = [record.getMessage() for record in caplog.records if record.name.startswith("tasks")]
    assert ours and not any("@example.com" in line for line in ours)


# --- admin ------------------------------------------------------------------------


def test_the_event_admin_lists_filters_by_name_and_is_read_only(admin_client, dst_day_events: date) -> None:
    service.aggregate_day(dst_day_events)

    listing = admin_client.get("/admin/tasks/event/?name=signup&timestamp__year=2026")
    page = listing.content.decode()
    assert listing.status_code == 200
    assert page.count('<td class="field-name">signup</td>') == 2
    assert '<td class="field-name">page_view</td>' not in page and "?name=page_view" in page
    assert admin_client.get("/admin/tasks/event/add/").status_code == 403
    some = Event.objects.first()
    assert some is not None
    detail = admin_client.get(f"/admin/tasks/event/{some.pk}/change/").content.decode()
    assert 'name="_save"' not in detail


def test_the_daily_metric_admin_lists_and_filters_by_event_name(admin_client, dst_day_events: date) -> None:
    service.aggregate_day(dst_day_events)

    page = admin_client.get("/admin/tasks/dailymetric/?event_name=signup&day__year=2026").content.decode()

    assert "signup" in page and page.count('class="action-select"') == 1
