"""Data sync without Celery: the guarded fetcher, page parsing, upserts, runs and exports.

The upstream is a real HTTP server on loopback (tests/tasks/upstream.py); its
host is let through the SSRF guard only where a test says so.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs import tree
from jobs.models import Job
from tasks import data_sync
from tasks.admin.data_sync import DataSourceForm
from tasks.models import DataSource, SyncedRecord, SyncExport, SyncRun
from tasks.services import data_sync as service
from tasks.services.fetch import (
    Fetcher,
    FetchPolicy,
    PermanentFetchError,
    RefusedURL,
    ResponseTooLarge,
    TransientFetchError,
    check_url,
    parse_allowed_hosts,
    parse_retry_after,
    refusal_reason,
)
from tests.tasks.upstream import Upstream, make_records
from tests.waiting import wait_for


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream(make_records(7), page_size=3).start()
    yield server
    server.stop()


def allowing(*hosts: str, **overrides: Any) -> FetchPolicy:
    return FetchPolicy.from_settings(allowed_hosts=parse_allowed_hosts(hosts), **overrides)


def get(url: str, policy: FetchPolicy) -> Any:
    with Fetcher(policy) as fetcher:
        return fetcher.get(url)


def fake_resolver(answers: dict[str, list[str]], calls: list[str] | None = None) -> Any:
    """DNS is outside the test machine's world: names resolve to what the test says."""

    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        return answers[host]

    return resolve


# --- the SSRF guard ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("[::1]", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.1.10", "private"),
        ("172.16.0.1", "private"),
        ("[fd12:3456::1]", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("[fd00:ec2::254]", "cloud metadata"),
        ("169.254.10.1", "link-local"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 (a URL host, not a bind address)
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not a public address"),
        ("[::ffff:10.0.0.1]", "private"),
    ],
)
def test_it_refuses_addresses_that_are_not_public(host: str, reason: str) -> None:
    with pytest.raises(RefusedURL, match=reason):
        get(f"http://{host}/records", FetchPolicy.from_settings())


def test_it_refuses_loopback_before_sending_anything(upstream: Upstream) -> None:
    with pytest.raises(RefusedURL, match=r"127\.0\.0\.1.*loopback.*DATA_SYNC_ALLOWED_HOSTS"):
        get(upstream.url("/records"), FetchPolicy.from_settings())
    assert upstream.requests == []


def test_it_refuses_a_host_name_that_resolves_to_loopback(upstream: Upstream) -> None:
    with pytest.raises(RefusedURL, match=r"localhost, which resolves to .*loopback"):
        get(f"http://localhost:{upstream.port}/records", FetchPolicy.from_settings())
    assert upstream.requests == []


def test_it_refuses_a_name_when_any_of_its_addresses_is_private() -> None:
    policy = FetchPolicy.from_settings(
        resolver=fake_resolver({"mixed.example": ["93.184.216.34", "10.0.0.7"]})
    )
    with pytest.raises(RefusedURL, match=r"mixed\.example, which resolves to 10\.0\.0\.7"):
        get("http://mixed.example/records", policy)


def test_metadata_services_are_refused_even_when_allowed() -> None:
    policy = allowing("metadata.google.internal", "169.254.169.254")
    with pytest.raises(RefusedURL, match="metadata"):
        get("http://metadata.google.internal/computeMetadata/v1/", policy)
    with pytest.raises(RefusedURL, match="metadata"):
        get("http://169.254.169.254/latest/meta-data/", policy)


@pytest.mark.parametrize("url", ["ftp://example.com/data.csv", "file:///etc/passwd", "gopher://example.com/"])
def test_only_http_and_https_are_fetched(url: str) -> None:
    with pytest.raises(RefusedURL, match="only http and https"):
        get(url, FetchPolicy.from_settings())


def test_an_allowed_host_is_fetched(upstream: Upstream) -> None:
    page = get(upstream.url("/records?page=1"), allowing(upstream.host))

    assert page.status == 200
    assert json.loads(page.body)["results"][0]["id"] == 1


def test_an_allowed_host_with_another_port_is_still_refused(upstream: Upstream) -> None:
    with pytest.raises(RefusedURL, match="loopback"):
        get(upstream.url("/records"), allowing(f"127.0.0.1:{upstream.port + 1}"))


def test_the_connection_goes_to_the_checked_address_with_the_original_host_header(upstream: Upstream) -> None:
    # A rebinding resolver: the first answer (the one checked) is the upstream,
    # any later lookup would say 192.0.2.1. Only one lookup may happen.
    calls: list[str] = []
    answers = iter([["127.0.0.1"]])

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers, ["192.0.2.1"])

    policy = allowing(f"data.example.test:{upstream.port}", resolver=rebinding)
    page = get(f"http://data.example.test:{upstream.port}/records?page=1", policy)

    assert page.status == 200
    assert calls == ["data.example.test"]
    assert upstream.requests == [("/records?page=1", f"data.example.test:{upstream.port}")]


def test_a_redirect_to_a_refused_address_is_not_followed(upstream: Upstream) -> None:
    upstream.route(
        "/moved",
        lambda handler: handler.answer(
            302, b"", headers={"Location": f"http://localhost:{upstream.port}/records?page=1"}
        ),
    )
    with pytest.raises(RefusedURL, match=r"localhost, which resolves to .*loopback"):
        get(upstream.url("/moved"), allowing(upstream.host))
    assert [path for path, _ in upstream.requests] == ["/moved"]


def test_a_redirect_to_the_metadata_service_is_not_followed(upstream: Upstream) -> None:
    upstream.route(
        "/moved",
        lambda handler: handler.answer(301, b"", headers={"Location": "http://169.254.169.254/latest/"}),
    )
    with pytest.raises(RefusedURL, match="cloud metadata"):
        get(upstream.url("/moved"), allowing(upstream.host))


def test_redirects_within_allowed_hosts_are_followed_up_to_the_limit(upstream: Upstream) -> None:
    upstream.route(
        "/moved", lambda handler: handler.answer(307, b"", headers={"Location": "/records?page=2"})
    )
    upstream.route("/loop", lambda handler: handler.answer(302, b"", headers={"Location": "/loop"}))

    page = get(upstream.url("/moved"), allowing(upstream.host))
    assert page.url == upstream.url("/records?page=2")
    assert json.loads(page.body)["results"][0]["id"] == 4

    with pytest.raises(RefusedURL, match=r"more than 2 redirects \(DATA_SYNC_MAX_REDIRECTS\)"):
        get(upstream.url("/loop"), allowing(upstream.host, max_redirects=2))
    assert upstream.hits("/loop") == 3


@pytest.mark.django_db
def test_the_admin_form_explains_a_refused_address() -> None:
    form = DataSourceForm(data={**SOURCE_FORM, "url": "http://10.0.0.5/feed"})

    assert not form.is_valid()
    assert "10.0.0.5 (port 80): a private address" in form.errors["url"][0]
    assert "DATA_SYNC_ALLOWED_HOSTS" in form.errors["url"][0]


@pytest.mark.django_db
def test_the_admin_form_accepts_a_public_address() -> None:
    form = DataSourceForm(data={**SOURCE_FORM, "url": "https://93.184.216.34/feed"})

    assert form.is_valid(), form.errors


SOURCE_FORM = {
    "name": "shop",
    "kind": "json",
    "id_field": "id",
    "records_path": "results",
    "next_path": "next",
    "batch_size": "500",
    "enabled": "on",
}


@pytest.mark.parametrize(
    "address",
    ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e"],
)
def test_public_addresses_pass(address: str) -> None:
    import ipaddress

    assert refusal_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("2002:a00:1::1", "private"),  # 6to4 around 10.0.0.1
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 around 127.0.0.1
        ("fe80::1", "link-local"),
        ("::", "unspecified"),
        ("ff02::1", "multicast"),
    ],
)
def test_ipv6_forms_of_refused_addresses_are_refused(address: str, reason: str) -> None:
    import ipaddress

    assert reason in (refusal_reason(ipaddress.ip_address(address)) or "")


def test_allowed_host_entries_take_names_ips_and_ports() -> None:
    assert parse_allowed_hosts(["API.internal", "127.0.0.1:8080", "[::1]:9000", "fd00::1", " "]) == {
        ("api.internal", None),
        ("127.0.0.1", 8080),
        ("::1", 9000),
        ("fd00::1", None),
    }
    with pytest.raises(ValueError, match="port that is not a number"):
        parse_allowed_hosts(["example.com:http"])


def test_check_url_returns_the_addresses_it_checked() -> None:
    policy = FetchPolicy.from_settings(resolver=fake_resolver({"api.example": ["93.184.216.34"]}))
    assert check_url("https://api.example/v1/items", policy) == ["93.184.216.34"]


# --- status, size and time ----------------------------------------------------------


@pytest.mark.parametrize(("status", "kind"), [(503, TransientFetchError), (500, TransientFetchError),
                                              (429, TransientFetchError), (408, TransientFetchError),
                                              (404, PermanentFetchError), (400, PermanentFetchError),
                                              (401, PermanentFetchError)])  # fmt: skip
def test_server_errors_and_throttling_are_transient_other_4xx_permanent(
    upstream: Upstream, status: int, kind: type[Exception]
) -> None:
    upstream.fail("/records?page=1", status)
    with pytest.raises(kind, match=f"answered {status}") as raised:
        get(upstream.url("/records?page=1"), allowing(upstream.host))
    if kind is PermanentFetchError:
        assert not isinstance(raised.value, TransientFetchError)


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize(
    ("header", "seconds"),
    [("120", 120.0), ("0", 0.0), ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0), ("99999999", 3600.0)],
)
def test_retry_after_of_429_and_503_is_carried_by_the_transient_error(
    upstream: Upstream, status: int, header: str, seconds: float
) -> None:
    upstream.fail("/records?page=1", status, headers={"Retry-After": header})
    with pytest.raises(TransientFetchError, match=f"answered {status}") as raised:
        get(upstream.url("/records?page=1"), allowing(upstream.host))
    assert raised.value.retry_after == seconds


@pytest.mark.parametrize(("status", "header"), [(503, None), (503, "soon"), (500, "30"), (408, "30")])
def test_no_retry_after_without_a_readable_header_on_429_or_503(
    upstream: Upstream, status: int, header: str | None
) -> None:
    upstream.fail("/records?page=1", status, headers={"Retry-After": header} if header else None)
    with pytest.raises(TransientFetchError) as raised:
        get(upstream.url("/records?page=1"), allowing(upstream.host))
    assert raised.value.retry_after is None


def test_retry_after_reads_seconds_and_http_dates_and_bounds_them() -> None:
    now = datetime(2026, 11, 29, 6, 0, 0, tzinfo=UTC)
    assert parse_retry_after("30", now) == 30.0
    assert parse_retry_after(" 7 ", now) == 7.0
    assert parse_retry_after("Sun, 29 Nov 2026 06:01:30 GMT", now) == 90.0
    assert parse_retry_after("Sun, 29 Nov 2026 05:00:00 GMT", now) == 0.0  # past: now
    assert parse_retry_after("Sun, 06 Dec 2026 06:00:00 GMT", now) == 3600.0  # a week: capped
    assert parse_retry_after("9" * 400, now) == 3600.0
    for unreadable in (None, "", "-5", "1.5", "soon", "Sun, 99 Nov 2026 06:01:30 GMT"):
        assert parse_retry_after(unreadable, now) is None


def test_error_messages_leave_out_query_strings_and_credentials(upstream: Upstream) -> None:
    with pytest.raises(PermanentFetchError) as raised:
        get(f"http://user:hunter2@{upstream.host}/missing?token=s3cret", allowing(upstream.host))
    assert "s3cret" not in str(raised.value)
    assert "hunter2" not in str(raised.value)
    assert f"http://{upstream.host}/missing?…" in str(raised.value)


def test_a_refused_connection_is_transient(upstream: Upstream) -> None:
    upstream.stop()
    with pytest.raises(TransientFetchError, match="ConnectError"):
        get(upstream.url("/records"), allowing(upstream.host))


def test_a_body_over_the_declared_cap_is_refused(upstream: Upstream) -> None:
    upstream.route("/big", lambda handler: handler.answer(200, b"x" * 50_000))
    with pytest.raises(ResponseTooLarge, match=r"DATA_SYNC_MAX_RESPONSE_BYTES \(10000 bytes\)"):
        get(upstream.url("/big"), allowing(upstream.host, max_bytes=10_000))


def test_reading_an_endless_body_stops_at_the_cap(upstream: Upstream) -> None:
    def endless(handler: Any) -> None:
        handler.close_connection = True
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.end_headers()  # no Content-Length: the body runs until the connection closes
        try:
            while not upstream.released.is_set():
                handler.wfile.write(b"[" * 65536)
        except OSError:
            pass

    upstream.route("/endless", endless)
    with pytest.raises(ResponseTooLarge, match="DATA_SYNC_MAX_RESPONSE_BYTES"):
        get(upstream.url("/endless"), allowing(upstream.host, max_bytes=1_000_000))


def test_a_server_that_does_not_answer_times_out_as_transient(upstream: Upstream) -> None:
    upstream.route("/slow", lambda handler: upstream.released.wait(10))
    started = time.monotonic()
    with pytest.raises(TransientFetchError, match="timed out"):
        get(upstream.url("/slow"), allowing(upstream.host, read_timeout=0.2))
    assert time.monotonic() - started < 5


def test_a_body_dripping_in_slowly_hits_the_page_deadline(upstream: Upstream) -> None:
    def drip(handler: Any) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        try:
            while not upstream.released.wait(0.02):
                handler.wfile.write(b" ")
                handler.wfile.flush()
        except OSError:
            pass

    upstream.route("/drip", drip)
    with pytest.raises(TransientFetchError, match=r"DATA_SYNC_PAGE_TIMEOUT \(0.5 s\)"):
        get(upstream.url("/drip"), allowing(upstream.host, read_timeout=2, page_timeout=0.5))


# --- pages ----------------------------------------------------------------------


def make_source(upstream: Upstream, **fields: Any) -> DataSource:
    values: dict[str, Any] = {
        "name": "shop",
        "kind": DataSource.Kind.JSON,
        "url": upstream.url("/records?page=1"),
        "batch_size": 4,
    }
    return DataSource.objects.create(**{**values, **fields})


@pytest.fixture
def allow_upstream(settings: Any, upstream: Upstream) -> None:
    settings.DATA_SYNC_ALLOWED_HOSTS = [upstream.host]


@pytest.mark.django_db
@pytest.mark.usefixtures("allow_upstream")
def test_collect_follows_next_links_through_every_page(upstream: Upstream) -> None:
    pages_seen: list[tuple[int, int]] = []

    collected = service.collect(make_source(upstream), on_page=lambda *progress: pages_seen.append(progress))

    assert [record["id"] for record in collected.records] == [1, 2, 3, 4, 5, 6, 7]
    assert (collected.pages, collected.fetched, collected.failed) == (3, 7, 0)
    assert pages_seen == [(1, 3), (2, 6), (3, 7)]


@pytest.mark.django_db
@pytest.mark.usefixtures("allow_upstream")
def test_collect_counts_records_without_an_id_and_later_copies_of_an_id_as_failed(upstream: Upstream) -> None:
    # The first copy of an id wins: a sync stores records page by page, before it sees later copies.
    upstream.records = [{"id": 1, "v": "first"}, {"name": "no id"}, {"id": ""}, {"id": 1, "v": "again"}, "x"]

    collected = service.collect(make_source(upstream))

    assert collected.records == [{"id": 1, "v": "first"}]
    assert (collected.fetched, collected.failed) == (5, 4)


def test_a_page_is_retried_in_place_waiting_what_retry_after_asks(upstream: Upstream) -> None:
    upstream.fail("/records?page=1", 503, 429, headers={"Retry-After": "2"})
    waits: list[float] = []

    with Fetcher(allowing(upstream.host)) as fetcher:
        fetched = service.fetch_page(
            fetcher, upstream.url("/records?page=1"), service.PageRetry(3, 0.01, 5.0), sleep=waits.append
        )

    assert fetched.status == 200 and waits == [2.0, 2.0]
    assert upstream.hits("/records?page=1") == 3


def test_a_page_gives_up_after_its_budget_with_the_last_error(upstream: Upstream) -> None:
    upstream.fail("/records?page=1", 500, 502, 503, headers={"Retry-After": "1"})
    waits: list[float] = []

    with Fetcher(allowing(upstream.host)) as fetcher, pytest.raises(TransientFetchError) as raised:
        service.fetch_page(
            fetcher, upstream.url("/records?page=1"), service.PageRetry(3, 0.01, 5.0), sleep=waits.append
        )

    assert "answered 503" in str(raised.value) and raised.value.retry_after == 1.0
    assert len(waits) == 2 and all(0.005 <= wait <= 0.02 for wait in waits)  # backoff: 0.01, then 0.02
    assert upstream.hits("/records?page=1") == 3


def test_a_retry_after_longer_than_the_bound_is_left_to_the_task_retry(upstream: Upstream) -> None:
    upstream.fail("/records?page=1", 429, headers={"Retry-After": "600"})
    waits: list[float] = []

    with Fetcher(allowing(upstream.host)) as fetcher, pytest.raises(TransientFetchError) as raised:
        service.fetch_page(
            fetcher, upstream.url("/records?page=1"), service.PageRetry(3, 0.01, 30.0), sleep=waits.append
        )

    assert raised.value.retry_after == 600.0 and waits == []  # no worker waits ten minutes
    assert upstream.hits("/records?page=1") == 1


def test_page_retry_waits_grow_and_stop_at_the_bound() -> None:
    retry = service.PageRetry(attempts=6, base=1.0, maximum=3.0)
    error = TransientFetchError("boom")
    assert [retry.delay(n, error) is not None for n in range(1, 7)] == [True] * 5 + [False]
    assert all(0.5 <= (retry.delay(1, error) or 0) <= 1.0 for _ in range(20))
    assert all(1.5 <= (retry.delay(5, error) or 0) <= 3.0 for _ in range(20))
    assert retry.delay(1, TransientFetchError("slow down", retry_after=2.5)) == 2.5
    assert retry.delay(1, TransientFetchError("slow down", retry_after=3.5)) is None


@pytest.mark.django_db
@pytest.mark.usefixtures("allow_upstream")
def test_a_feed_cuts_batches_across_pages_and_checkpoints_when_none_is_half_full(upstream: Upstream) -> None:
    source = make_source(upstream)  # 7 records in pages of 3; batches of 4
    feed = service.Feed(source, service.Checkpoint(), set(), size=4)
    seen: list[tuple[list[tuple[int, list[int]]], service.Checkpoint | None]] = []

    with Fetcher() as fetcher:
        for page in service.iter_pages(source, fetcher):
            batches = [(position, [r["id"] for r in records]) for position, records in feed.add(page)]
            seen.append((batches, feed.checkpoint()))
    last = feed.flush()

    assert [batches for batches, _ in seen] == [[], [(0, [1, 2, 3, 4])], []]
    assert [checkpoint for _, checkpoint in seen] == [None, None, None]  # a batch was always half full
    assert last is not None and (last[0], [r["id"] for r in last[1]]) == (1, [5, 6, 7])
    done = feed.checkpoint()
    assert done == service.Checkpoint("", pages=3, fetched=7, records=7, batches=2, complete=True)


@pytest.mark.django_db
@pytest.mark.usefixtures("allow_upstream")
def test_a_run_resumes_at_its_checkpoint_with_exact_counts(upstream: Upstream) -> None:
    """Stopped after page 2, resumed from the checkpoint saved in the run: page 3 on only, the
    counts go on, and an id the first pages took counts as failed when it comes again."""
    again = [{"id": 2, "name": "again"}, {"name": "no id"}]
    upstream.records = [*make_records(6), *again, *make_records(1, start=9)]
    source = make_source(upstream, batch_size=4)
    run = service.start_run(source, "resumed")
    first = service.Feed(source, service.Checkpoint.of(run), set(), size=4)
    spawned: list[tuple[int, list[Any]] | None] = []
    with Fetcher() as fetcher:
        for page in service.iter_pages(source, fetcher):
            spawned += first.add(page)
            if page.number == 2:
                break
    spawned += [first.flush()]  # what the sync does when it gives up: the pages so far are batched
    stopped = first.checkpoint()
    assert stopped is not None
    service.save_checkpoint(run.pk, stopped)

    run.refresh_from_db()
    start = service.Checkpoint.of(run)
    assert (start.next_url, start.pages, start.batches) == (upstream.url("/records?page=3"), 2, 2)
    upstream.requests.clear()
    seen = {str(record["id"]) for batch in spawned if batch for record in batch[1]}
    second = service.Feed(source, start, seen, size=4)
    with Fetcher() as fetcher:
        for page in service.iter_pages(source, fetcher, start_url=start.next_url, pages_before=start.pages):
            assert page.number == 3
            second.add(page)
    last = second.flush()
    done = second.checkpoint()

    assert upstream.paths() == ["/records?page=3"]
    assert last is not None and last[0] == 2 and [r["id"] for r in last[1]] == [9]
    assert done == service.Checkpoint("", pages=3, fetched=9, failed=2, records=7, batches=3, complete=True)


@pytest.mark.django_db
@pytest.mark.usefixtures("allow_upstream")
def test_collect_reads_csv(upstream: Upstream) -> None:
    upstream.records = [{"id": "a", "name": "Ann"}, {"id": "b", "name": "Bob"}]

    collected = service.collect(
        make_source(upstream, kind=DataSource.Kind.CSV, url=upstream.url("/records.csv"))
    )

    assert collected.records == [{"id": "a", "name": "Ann"}, {"id": "b", "name": "Bob"}]
    assert collected.pages == 1


@pytest.mark.django_db
@pytest.mark.usefixtures("allow_upstream")
def test_a_csv_row_with_the_wrong_number_of_cells_is_failed_not_fatal(upstream: Upstream) -> None:
    upstream.route("/data.csv", lambda h: h.answer(200, b"\xef\xbb\xbfid,name\n1,Ann\n2,Bob,extra\n\n3,Cy\n"))

    collected = service.collect(
        make_source(upstream, kind=DataSource.Kind.CSV, url=upstream.url("/data.csv"))
    )

    assert collected.records == [{"id": "1", "name": "Ann"}, {"id": "3", "name": "Cy"}]
    assert (collected.fetched, collected.failed) == (3, 1)


@pytest.mark.parametrize(
    ("body", "kind", "message"),
    [
        (b"{not json", DataSource.Kind.JSON, "is not valid JSON"),
        (b'{"items": []}', DataSource.Kind.JSON, "no 'results' in the page .records_path"),
        (b'{"results": {"id": 1}}', DataSource.Kind.JSON, "'results' is a dict, not a list"),
        (b'{"results": [], "next": 5}', DataSource.Kind.JSON, "'next' is a int, not a URL"),
        # json.loads raised RecursionError on these (json.dumps of the records would too, nearer 1,000)
        (
            b"[" * 100_000 + b"]" * 100_000,
            DataSource.Kind.JSON,
            "nests arrays and objects 100000 levels deep",
        ),
        (
            b'{"results": [{"id": 1, "tree": ' + b"[" * 990 + b"]" * 990 + b"}]}",
            DataSource.Kind.JSON,
            r"is refused: it nests arrays and objects 993 levels deep; at most 64 are accepted",
        ),
        (b"id,name\n\xff\xfe,x\n", DataSource.Kind.CSV, "is not UTF-8"),
        (b'id,name\n1,"unclosed\n', DataSource.Kind.CSV, "bad CSV at line"),
        (b"id,id\n1,2\n", DataSource.Kind.CSV, "repeats a column name"),
    ],
)
@pytest.mark.django_db
@pytest.mark.usefixtures("allow_upstream")
def test_a_page_that_is_not_what_the_source_says_is_a_permanent_error(
    upstream: Upstream, body: bytes, kind: str, message: str
) -> None:
    upstream.route("/bad", lambda handler: handler.answer(200, body))
    source = make_source(upstream, kind=kind, url=upstream.url("/bad"))

    with pytest.raises(service.SourceDataError, match=message):
        service.collect(source)


@pytest.mark.django_db
@pytest.mark.usefixtures("allow_upstream")
def test_nested_paths_and_absolute_next_links(upstream: Upstream) -> None:
    def page(handler: Any) -> None:
        number = int(handler.path.rsplit("=", 1)[1])
        following = upstream.url(f"/nested?p={number + 1}") if number < 2 else None
        payload = {"data": {"items": [{"meta": {"key": f"k{number}"}}]}, "links": {"next": following}}
        handler.answer(200, json.dumps(payload).encode())

    upstream.route("/nested", page)
    source = make_source(
        upstream,
        url=upstream.url("/nested?p=1"),
        records_path="data.items",
        next_path="links.next",
        id_field="meta.key",
    )

    collected = service.collect(source)

    assert collected.records == [{"meta": {"key": "k1"}}, {"meta": {"key": "k2"}}]


@pytest.mark.django_db
@pytest.mark.usefixtures("allow_upstream")
def test_next_links_that_loop_or_never_end_are_stopped(upstream: Upstream, settings: Any) -> None:
    upstream.route("/loop", lambda h: h.answer(200, b'{"results": [], "next": "/loop?again"}'))
    upstream.route("/loop2", lambda h: h.answer(200, b'{"results": [], "next": "/loop2"}'))
    with pytest.raises(service.SourceDataError, match="points back to an earlier page"):
        service.collect(make_source(upstream, url=upstream.url("/loop2")))

    settings.DATA_SYNC_MAX_PAGES = 3
    upstream.records = make_records(20)
    with pytest.raises(service.SourceDataError, match=r"more than 3 pages \(DATA_SYNC_MAX_PAGES"):
        service.collect(make_source(upstream, name="other"))


# --- upserts --------------------------------------------------------------------


@pytest.fixture
def source(db: None) -> DataSource:
    return DataSource.objects.create(name="catalog", url="https://93.184.216.34/items", batch_size=100)


def test_upsert_creates_then_leaves_unchanged_records_alone(source: DataSource) -> None:
    records = make_records(5)
    first = service.upsert_records(source, records)
    stamps = dict(SyncedRecord.objects.values_list("external_id", "changed_at"))

    second = service.upsert_records(source, [dict(reversed(list(r.items()))) for r in records])

    assert first.as_dict() == {"created": 5, "updated": 0, "unchanged": 0, "failed": 0}
    assert second.as_dict() == {"created": 0, "updated": 0, "unchanged": 5, "failed": 0}
    assert dict(SyncedRecord.objects.values_list("external_id", "changed_at")) == stamps


def test_upsert_updates_exactly_the_changed_records(source: DataSource) -> None:
    records = make_records(5)
    service.upsert_records(source, records, now=timezone.now() - timedelta(hours=1))
    before = dict(SyncedRecord.objects.values_list("external_id", "changed_at"))
    records[1]["price"] = 999
    records[3]["tags"] = ["c"]

    counts = service.upsert_records(source, [*records, {"id": 6, "name": "new"}])

    assert counts.as_dict() == {"created": 1, "updated": 2, "unchanged": 3, "failed": 0}
    after = dict(SyncedRecord.objects.values_list("external_id", "changed_at"))
    moved = {key for key in before if after[key] != before[key]}
    assert moved == {"2", "4"}
    assert SyncedRecord.objects.get(external_id="2").data["price"] == 999


def test_records_that_cannot_be_stored_are_failed_not_fatal(source: DataSource) -> None:
    counts = service.upsert_records(
        source,
        [
            {"id": 1},
            {"name": "no id"},
            {"id": None},
            {"id": True},
            {"id": {"nested": 1}},
            {"id": "x" * 300},
            {"id": 2, "price": float("nan")},
            {"id": 3, "note": "nul \x00 inside"},
            {"id": 4, "note": "lone \ud800 surrogate"},
            "not an object",
        ],
    )

    assert counts.as_dict() == {"created": 1, "updated": 0, "unchanged": 0, "failed": 9}
    assert list(SyncedRecord.objects.values_list("external_id", flat=True)) == ["1"]


def test_ids_are_text_and_a_repeated_id_keeps_the_last_copy(source: DataSource) -> None:
    counts = service.upsert_records(source, [{"id": 7, "v": 1}, {"id": "7", "v": 2}])

    assert counts.as_dict() == {"created": 1, "updated": 0, "unchanged": 0, "failed": 1}
    assert SyncedRecord.objects.get(external_id="7").data == {"id": "7", "v": 2}


def test_a_batch_costs_one_select_of_checksums_and_no_writes_when_nothing_changed(source: DataSource) -> None:
    records = make_records(300)
    changed = [{**record, "price": -1} for record in records]
    with CaptureQueriesContext(connection) as creating:
        first = service.upsert_records(source, records)
    stamps = dict(SyncedRecord.objects.values_list("external_id", "changed_at"))
    with CaptureQueriesContext(connection) as rerun:
        second = service.upsert_records(source, records)
    with CaptureQueriesContext(connection) as changing:
        third = service.upsert_records(source, changed)

    def statements(context: CaptureQueriesContext, verb: str) -> int:
        return sum(
            1
            for query in context.captured_queries
            if query["sql"].startswith(verb) and "tasks_syncedrecord" in query["sql"]
        )

    assert (first.created, second.unchanged, third.updated) == (300, 300, 300)
    assert [statements(rerun, verb) for verb in ("SELECT", "INSERT", "UPDATE")] == [1, 0, 0]
    assert dict(SyncedRecord.objects.values_list("external_id", "changed_at")) != stamps
    assert statements(creating, "SELECT") == statements(changing, "SELECT") == 1
    if connection.vendor == "postgresql":  # the new and the changed: one INSERT ... ON CONFLICT DO UPDATE
        assert [statements(creating, verb) for verb in ("INSERT", "UPDATE")] == [1, 0]
        assert [statements(changing, verb) for verb in ("INSERT", "UPDATE")] == [1, 0]
    else:
        assert statements(creating, "INSERT") >= 1
        assert statements(changing, "UPDATE") >= 1


def test_a_record_another_sync_stored_meanwhile_is_updated_or_left_and_counted_so(source: DataSource) -> None:
    # What the SELECT of a batch cannot see: a row inserted after it by a concurrent sync.
    if connection.vendor != "postgresql":
        pytest.skip("the conflict clause is PostgreSQL's; elsewhere ConcurrentUpsertError retries the batch")
    records = make_records(3)
    prepared = {str(record["id"]): service._prepare(record, "id") for record in records}
    service.upsert_records(source, records[:1])
    service.upsert_records(source, [{**records[1], "price": -1}])

    created, updated = service._upsert_on_conflict(
        source, {key: value for key, value in prepared.items() if value is not None}, timezone.now()
    )

    assert (created, updated) == (1, 1)  # record 1 was stored as is: neither
    assert SyncedRecord.objects.get(external_id=str(records[1]["id"])).data == records[1]


def test_one_batch_of_new_changed_and_unchanged_records_is_counted_exactly(source: DataSource) -> None:
    service.upsert_records(source, make_records(10))
    before = dict(SyncedRecord.objects.values_list("external_id", "changed_at"))
    later = timezone.now() + timedelta(minutes=1)
    batch = make_records(10) + make_records(15)[10:]
    batch[0] = {**batch[0], "price": -1}
    batch[1] = {**batch[1], "price": -2}

    counts = service.upsert_records(source, batch, now=later)

    assert counts.as_dict() == {"created": 5, "updated": 2, "unchanged": 8, "failed": 0}
    after = dict(SyncedRecord.objects.values_list("external_id", "changed_at"))
    moved = sorted(key for key in before if after[key] != before[key])
    assert moved == sorted([str(batch[0]["id"]), str(batch[1]["id"])])
    assert SyncedRecord.objects.get(external_id=str(batch[0]["id"])).data["price"] == -1
    assert SyncedRecord.objects.count() == 15


# --- runs -----------------------------------------------------------------------


def test_a_run_is_found_again_by_its_task_id_and_finishes_with_the_summed_counts(source: DataSource) -> None:
    run = service.start_run(source, "task-1")
    assert service.start_run(source, "task-1").pk == run.pk

    assert service.finish_run(
        run.pk,
        [
            {"created": 3, "updated": 1, "unchanged": 0, "failed": 0},
            {"created": 1, "updated": 0, "unchanged": 2, "failed": 1},
        ],
        failed_before=2,
    )
    run.refresh_from_db()
    assert (run.status, run.created, run.updated, run.unchanged, run.failed) == ("succeeded", 4, 1, 2, 3)
    assert run.finished_at is not None
    assert not service.fail_run(run.pk, "too late")


@pytest.mark.django_db
def test_a_sync_spawning_its_batches_again_in_other_groups_gets_each_batch_once() -> None:
    """A resumed sync whose pages now cut its batches otherwise: a call that finds some of its
    batches recorded records the others (it used to look at the first only)."""
    later = 10**7  # past the broker's horizon: recorded, not sent (no worker needs to see them)

    def batch(number: int) -> tree.ChildSpec:
        return tree.ChildSpec("data_sync.upsert_batch", {"run_id": number, "records": []}, later)

    tree.spawn(None, "sync-task", [batch(0)])
    tree.spawn(None, "sync-task", [batch(0), batch(1)])
    tree.spawn(None, "sync-task", [batch(2)], first_index=2)

    rows = dict(Job.objects.filter(type="data_sync.upsert_batch").values_list("pk", "payload"))
    assert rows == {tree.child_id("sync-task", n): {"run_id": n, "records": []} for n in range(3)}


def test_the_first_error_of_a_failed_run_is_kept(source: DataSource) -> None:
    run = service.start_run(source, "task-2")
    service.note_retry(run.pk, "attempt 1 failed, retrying")

    assert service.fail_run(run.pk, "batch 3 failed: boom")
    assert not service.fail_run(run.pk, "the chord failed")
    assert not service.finish_run(run.pk, [])
    run.refresh_from_db()
    assert (run.status, run.error) == (SyncRun.Status.FAILED, "batch 3 failed: boom")


# --- exports --------------------------------------------------------------------


def read_lines(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_export_writes_changes_since_the_last_export_then_nothing(source: DataSource, tmp_path: Path) -> None:
    service.upsert_records(source, make_records(3), now=timezone.now() - timedelta(minutes=5))

    first = service.export_changes(source, export_dir=tmp_path, lag=timedelta(0))
    second = service.export_changes(source, export_dir=tmp_path, lag=timedelta(0))

    assert first.records == 3 and first.since is None
    lines = read_lines(first.path)
    assert [line["external_id"] for line in lines] == ["1", "2", "3"]
    assert lines[0]["data"] == make_records(1)[0] and lines[0]["source"] == "catalog"
    assert (second.records, second.path, second.since) == (0, "", first.until)
    assert sorted(path.name for path in tmp_path.iterdir()) == [Path(first.path).name]  # no temp files


def test_export_takes_only_records_changed_after_the_watermark(source: DataSource, tmp_path: Path) -> None:
    records = make_records(4)
    service.upsert_records(source, records, now=timezone.now() - timedelta(minutes=5))
    service.export_changes(source, export_dir=tmp_path, lag=timedelta(0))
    records[2]["price"] = 1

    service.upsert_records(source, records)
    export = service.export_changes(source, export_dir=tmp_path, lag=timedelta(0))

    assert [line["external_id"] for line in read_lines(export.path)] == ["3"]
    assert SyncExport.objects.count() == 2


def test_export_leaves_changes_inside_the_lag_for_the_next_export(source: DataSource, tmp_path: Path) -> None:
    service.upsert_records(source, make_records(2))

    early = service.export_changes(source, export_dir=tmp_path, lag=timedelta(minutes=1))
    later = service.export_changes(
        source, export_dir=tmp_path, lag=timedelta(minutes=1), now=timezone.now() + timedelta(minutes=2)
    )

    assert (early.records, later.records) == (0, 2)


def test_an_export_of_all_sources_keeps_its_own_watermark(source: DataSource, tmp_path: Path) -> None:
    other = DataSource.objects.create(name="other", url="https://93.184.216.34/other")
    service.upsert_records(source, make_records(2), now=timezone.now() - timedelta(minutes=5))
    service.upsert_records(other, make_records(1), now=timezone.now() - timedelta(minutes=5))
    service.export_changes(source, export_dir=tmp_path, lag=timedelta(0))

    everything = service.export_changes(None, export_dir=tmp_path, lag=timedelta(0))

    assert everything.records == 3
    assert Path(everything.path).name.startswith("all-")


# --- resuming through a worker (this module runs on SQLite in CI as well) ---------


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_sync_past_a_pages_budget_resumes_at_that_page_through_the_worker(
    celery_worker: object, upstream: Upstream, settings: Any
) -> None:
    settings.DATA_SYNC_ALLOWED_HOSTS = [upstream.host]
    upstream.fail("/records?page=2", 503, 503, 503, 503)  # 3 tries a page: the retry's first try fails too
    source = make_source(upstream)

    result = data_sync.sync.delay(source_id=source.pk)
    job = wait_for(lambda: Job.objects.filter(task_id=result.id, status__in=Job.FINAL).first(), timeout=60)

    run = SyncRun.objects.get(task_id=result.id)
    assert (job.status, job.attempts) == (Job.Status.SUCCEEDED, 2)
    assert upstream.paths() == ["/records?page=1"] + ["/records?page=2"] * 5 + ["/records?page=3"]
    assert (run.status, run.created, run.failed, run.fetched, run.page_retries) == ("succeeded", 7, 0, 7, 3)
    assert Job.objects.filter(parent=job).count() == run.batches == 2  # 1-3 at the give-up, then 4-7
    assert SyncedRecord.objects.filter(source=source).count() == 7
