"""Time and web worker memory for the largest bodies the API takes, and for ones it refuses.

    .venv/bin/python -m bench.request_limits [--repetitions 3] [--workers 2]
        [--database-url postgres://postgres@127.0.0.1:5432/bench_api]
        [--broker-url redis://127.0.0.1:6379/12]

Starts `gunicorn config.wsgi` as the Procfile does (production settings, sync workers) on the
bench's own PostgreSQL database and Redis broker, makes a staff user's token, then sends, one at a
time, each body --repetitions times:

- `analytics.ingest` with 10,000 events of ordinary size (the documented maximum count);
- `email.newsletter` with 100,000 addresses (the documented maximum);
- `analytics.ingest` of 10,000 events padded to just under JOBS_API_MAX_BULK_BODY_BYTES (8 MiB);
- `POST /api/jobs/batch` of two such entries: just under JOBS_API_MAX_BATCH_BYTES (16 MiB);
- a Content-Length over the bulk limit (9 MiB): refused `413` before the body is read (the
  client waits for the answer before sending it);
- `[` 100,000 deep then `]` 100,000 times: refused `400` by the depth check.

Each body gets a gunicorn of its own (so that memory a worker kept from an earlier body does not
hide what this one costs), warmed up with small requests to every worker. For each: the status,
the time from sending to the whole answer, the workers' idle RSS, and the peak RSS of the web
worker that served it (the kernel's high-water mark, VmHWM, reset before each request through
/proc/<pid>/clear_refs, read after), with its growth during the request. The jobs are published
to the broker (no worker consumes them) and purged after each body. Writes the figures to
docs/results/request_limits.json.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.api import Gunicorn, free_port, wait_ready  # noqa: E402
from bench.support import setup_django, write_results  # noqa: E402

TIMESTAMP = "2026-11-23T10:00:00Z"


def ingest_job(events: int, pad: int = 0) -> dict[str, Any]:
    return {
        "type": "analytics.ingest",
        "payload": {
            "events": [
                {
                    "name": "page_view",
                    "user_id": f"user-{n:06d}",
                    "timestamp": TIMESTAMP,
                    "properties": {
                        "page": f"/products/{n % 500}",
                        "referrer": "https://www.example.com/",
                        "plan": "free",
                        **({"pad": "x" * pad} if pad else {}),
                    },
                }
                for n in range(events)
            ]
        },
    }


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def padded_ingest(events: int, at_most: int) -> dict[str, Any]:
    """An ingest job of `events` events whose compact JSON is just under `at_most` bytes."""
    base = len(compact(ingest_job(events, pad=1)))
    return ingest_job(events, pad=1 + (at_most - base) // events)


def bodies(max_events: int, max_recipients: int, bulk_limit: int, batch_limit: int) -> list[dict[str, Any]]:
    """Each body: its key in the results file, what it is, the path, the raw body, the status it must get."""
    newsletter = {
        "type": "email.newsletter",
        "payload": {
            "campaign": "bench",
            "template": "newsletter",
            "recipients": [f"reader{n}@example.com" for n in range(max_recipients)],
        },
    }
    # Leave room for the batch's own brackets and key within its limit.
    entry_limit = min(bulk_limit, (batch_limit - 64) // 2) - 1024
    big_ingest = padded_ingest(max_events, entry_limit)
    return [
        {
            "key": "ingest_10000_events",
            "what": f"analytics.ingest, {max_events:,} events",
            "path": "/api/jobs",
            "body": compact(ingest_job(max_events)),
            "expect": 202,
        },
        {
            "key": "newsletter_100000_addresses",
            "what": f"email.newsletter, {max_recipients:,} addresses",
            "path": "/api/jobs",
            "body": compact(newsletter),
            "expect": 202,
        },
        {
            "key": "ingest_8_mib",
            "what": "analytics.ingest at the bulk limit",
            "path": "/api/jobs",
            "body": compact(big_ingest),
            "expect": 202,
        },
        {
            "key": "batch_16_mib",
            "what": "batch of two at the bulk limit",
            "path": "/api/jobs/batch",
            "body": compact({"jobs": [big_ingest, big_ingest]}),
            "expect": 200,
        },
        {
            "key": "over_the_bulk_limit_413",
            "what": "Content-Length over the bulk limit",
            "path": "/api/jobs",
            "body": compact(padded_ingest(max_events, bulk_limit + 2**20)),
            "expect": 413,
            "declare_only": True,
        },
        {
            "key": "nesting_100000_deep_400",
            "what": "100,000-deep nesting",
            "path": "/api/jobs",
            "body": b"[" * 100_000 + b"]" * 100_000,
            "expect": 400,
        },
    ]


def worker_pids(gunicorn: Gunicorn) -> list[int]:
    import psutil  # type: ignore[import-untyped]

    return [child.pid for child in psutil.Process(gunicorn.process.pid).children()]


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


def reset_peaks(pids: list[int]) -> None:
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the RSS now


def send(port: int, token: str, path: str, body: bytes, declare_only: bool = False) -> tuple[int, float, str]:
    """POSTs the body; with `declare_only`, sends only the headers (its Content-Length) and waits."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    began = time.perf_counter()
    try:
        if declare_only:
            connection.putrequest("POST", path)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                connection.putheader(name, value)
            connection.endheaders()
        else:
            connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        answer = response.read()
        status = response.status
    except (ConnectionError, http.client.HTTPException) as exc:
        return 0, time.perf_counter() - began, type(exc).__name__
    finally:
        connection.close()
    return status, time.perf_counter() - began, answer[:200].decode(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repetitions", type=int, default=3, help="times each body is sent")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn --workers (WEB_CONCURRENCY)")
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/bench_api")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/12")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("reads the web workers' peak memory from /proc: Linux only")

    setup_django(args.database_url, args.broker_url, LOG_LEVEL="WARNING")
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from config.celery_app import app
    from jobs.models import Job
    from jobs.tokens import create_token
    from tasks.analytics import MAX_INGEST_EVENTS
    from tasks.email import MAX_NEWSLETTER_RECIPIENTS

    app.control.purge()
    Job.objects.all().delete()
    user, _ = get_user_model().objects.update_or_create(username="bench-limits", defaults={"is_staff": True})
    _, token = create_token(user, name="bench-limits")
    cases = bodies(
        MAX_INGEST_EVENTS,
        MAX_NEWSLETTER_RECIPIENTS,
        settings.JOBS_API_MAX_BULK_BODY_BYTES,
        settings.JOBS_API_MAX_BATCH_BYTES,
    )
    log_dir = Path(tempfile.mkdtemp(prefix="bench_request_limits_"))
    headers = {"Authorization": f"Bearer {token}"}
    figures: dict[str, Any] = {
        "limits_bytes": {
            "JOBS_API_MAX_BULK_BODY_BYTES": settings.JOBS_API_MAX_BULK_BODY_BYTES,
            "JOBS_API_MAX_BATCH_BYTES": settings.JOBS_API_MAX_BATCH_BYTES,
        },
        "idle_worker_rss_mib": [],
    }
    print(f"gunicorn config.wsgi --workers {args.workers}, production settings, a new one for each body")
    for case in cases:
        # A new gunicorn for each body: what one body costs does not depend on what came before it.
        port = free_port()
        gunicorn = Gunicorn(port, args.workers, log_dir / f"{case['key']}.log")
        try:
            asyncio.run(wait_ready(f"http://127.0.0.1:{port}", headers, gunicorn))
            pids = worker_pids(gunicorn)
            for _ in range(4 * args.workers):  # every worker has imported and connected: idle
                send(port, token, "/api/jobs", compact({"type": "default.ping", "payload": {}}))
            idle = [status_kib(pid, "VmRSS") / 1024 for pid in pids]
            figures["idle_worker_rss_mib"] += idle
            times, peaks, growths, statuses = [], [], [], []
            for _ in range(args.repetitions):
                before = {pid: status_kib(pid, "VmRSS") for pid in pids}
                reset_peaks(pids)
                status, seconds, answer = send(
                    port, token, case["path"], case["body"], case.get("declare_only", False)
                )
                after = {pid: status_kib(pid, "VmHWM") for pid in pids}
                peaks.append(max(after.values()) / 1024)
                growths.append(max(after[pid] - before[pid] for pid in pids) / 1024)
                times.append(seconds)
                statuses.append(status)
                if status != case["expect"]:
                    raise SystemExit(f"{case['what']}: {status} (expected {case['expect']}): {answer}")
        finally:
            gunicorn.stop()
            app.control.purge()
        size = len(case["body"])
        figures[case["key"]] = {
            "what": case["what"],
            "body_bytes": size,
            "status": statuses[0],
            "median_ms": statistics.median(times) * 1000,
            "max_ms": max(times) * 1000,
            "idle_worker_rss_mib": max(idle),
            "peak_worker_rss_mib": max(peaks),
            "peak_growth_mib": max(growths),
        }
        print(
            f"{case['what']:<42} {size / 2**20:6.2f} MiB  {statuses[0]}  "
            f"median {statistics.median(times) * 1000:7.0f} ms (max {max(times) * 1000:.0f})  "
            f"worker RSS idle {max(idle):4.0f} MiB, peak {max(peaks):4.0f} MiB "
            f"(+{max(growths):.0f} MiB during the request)"
        )
    Job.objects.all().delete()
    traceback = any("Traceback" in log.read_text() for log in log_dir.glob("*.log"))
    figures["traceback_in_log"] = traceback
    print(f"traceback in gunicorn's logs: {traceback} ({log_dir})")
    write_results(
        "request_limits", figures, vars(args), database_url=args.database_url, redis_url=args.broker_url
    )


if __name__ == "__main__":
    main()
