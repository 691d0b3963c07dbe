"""Throughput and latency of the REST API, served by gunicorn as the Procfile starts it.

    .venv/bin/python -m bench.api [--requests 2000] [--concurrency 16] [--batches 10]
        [--batch-size 1000] [--rate 200] [--duration 30] [--workers 2]
        [--database-url postgres://postgres@127.0.0.1:5432/bench_api]
        [--broker-url redis://127.0.0.1:6379/12]

Starts `gunicorn config.wsgi --workers W --access-logfile -` (production settings) on the
bench's own PostgreSQL database and Redis broker, makes a staff user's token
(JOBS_API_ENQUEUE_RATE=1000000/minute, so the limit never answers), then with httpx:
(a) POST /api/jobs (default.ping), N requests from C concurrent clients;
(b) POST /api/jobs/batch, B sequential batches of S jobs;
(c) an open loop at a fixed rate for D seconds, half POST /api/jobs and half
GET /api/jobs/{id}: each request is sent at its scheduled time whether or not earlier
ones have been answered, and its latency counts from that time (no coordinated omission);
(d) the RSS of gunicorn's master and workers afterwards.
No worker consumes: the jobs stay queued and are purged at the end. The load generator
runs on the same machine and takes CPU from gunicorn, PostgreSQL and Redis. Writes the figures
to docs/results/api.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.support import setup_django, write_results  # noqa: E402

PING = {"type": "default.ping", "payload": {}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def at(samples: list[float], q: float) -> float:
    """The nearest-rank percentile q of the samples, in milliseconds."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def latency(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "p50_ms": at(samples, 0.50),
        "p95_ms": at(samples, 0.95),
        "p99_ms": at(samples, 0.99),
        "max_ms": max(samples) * 1000,
    }


def ms(samples: list[float], q: float) -> str:
    return f"{at(samples, q):.1f}" if samples else "-"


def summary(samples: list[float]) -> str:
    return (
        f"p50 {ms(samples, 0.50)} ms, p95 {ms(samples, 0.95)} ms, p99 {ms(samples, 0.99)} ms, "
        f"max {max(samples) * 1000:.1f} ms"
        if samples
        else "no samples"
    )


class Gunicorn:
    """`gunicorn config.wsgi` as the Procfile runs it, in its own session; stopped (and killed) on exit."""

    def __init__(self, port: int, workers: int, log: Path) -> None:
        env = {
            **os.environ,
            "JOBS_API_ENQUEUE_RATE": "1000000/minute",
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
        self.log = log
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "gunicorn", "config.wsgi", "--bind", f"127.0.0.1:{port}"),
                *("--workers", str(workers), "--access-logfile", "-", "--forwarded-allow-ips=127.0.0.1"),
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches this script, which then stops gunicorn itself
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # graceful: the master stops its workers
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log_file.close()

    def rss(self) -> tuple[int, list[int]]:
        import psutil  # type: ignore[import-untyped]

        master = psutil.Process(self.process.pid)
        return master.memory_info().rss, [child.memory_info().rss for child in master.children()]


async def wait_ready(base: str, headers: dict[str, str], gunicorn: Gunicorn) -> None:
    import httpx

    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=base, headers=headers) as client:
        while time.monotonic() < deadline:
            if gunicorn.process.poll() is not None:
                raise SystemExit(f"gunicorn exited:\n{gunicorn.log.read_text()[-3000:]}")
            try:
                if (await client.get("/api/queues/default/stats")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"gunicorn did not answer; see {gunicorn.log}")


async def closed_loop(
    base: str, headers: dict[str, str], total: int, concurrency: int, path: str = "/api/jobs"
) -> dict[str, Any]:
    """(a) `total` POST /api/jobs from `concurrency` clients, each sending its next when answered
    (`path` "/healthz": GET /healthz the same way, the server's own rate to compare with)."""
    import httpx

    latencies: list[float] = []
    statuses: dict[int | str, int] = {}
    ids: list[str] = []
    remaining = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as client:

        async def one_client() -> None:
            for _ in remaining:
                began = time.perf_counter()
                try:
                    if path == "/healthz":
                        response = await client.get(path)
                    else:
                        response = await client.post(path, json=PING)
                    key: int | str = response.status_code
                    if key == 202:
                        ids.append(response.json()["id"])
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                latencies.append(time.perf_counter() - began)
                statuses[key] = statuses.get(key, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"elapsed": elapsed, "latencies": latencies, "statuses": statuses, "ids": ids}


async def batches(base: str, headers: dict[str, str], count: int, size: int) -> dict[str, Any]:
    """(b) `count` POST /api/jobs/batch of `size` jobs each, one after the other."""
    import httpx

    latencies: list[float] = []
    accepted = 0
    statuses: dict[int, int] = {}
    body = {"jobs": [PING] * size}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as client:
        started = time.perf_counter()
        for _ in range(count):
            began = time.perf_counter()
            response = await client.post("/api/jobs/batch", json=body)
            latencies.append(time.perf_counter() - began)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 200:
                accepted += response.json()["accepted"]
        elapsed = time.perf_counter() - started
    return {"elapsed": elapsed, "latencies": latencies, "accepted": accepted, "statuses": statuses}


async def open_loop(
    base: str, headers: dict[str, str], rate: float, duration: float, job_ids: list[str]
) -> dict[str, Any]:
    """(c) Requests sent at fixed intervals whatever the answers; latency from the scheduled time."""
    import httpx

    results: dict[str, list[float]] = {"POST /api/jobs": [], "GET /api/jobs/{id}": []}
    errors: dict[str, int] = {}
    lags: list[float] = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    total = int(rate * duration)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=10) as client:

        async def send(index: int, scheduled: float) -> None:
            name = "POST /api/jobs" if index % 2 == 0 else "GET /api/jobs/{id}"
            try:
                # Every request is given up 10 s after its scheduled time, so an overload ends.
                await asyncio.wait_for(attempt(index, name, scheduled), scheduled + 10 - time.perf_counter())
            except TimeoutError:
                errors[f"{name} over 10 s"] = errors.get(f"{name} over 10 s", 0) + 1

        async def attempt(index: int, name: str, scheduled: float) -> None:
            lags.append(time.perf_counter() - scheduled)
            try:
                if index % 2 == 0:
                    response = await client.post("/api/jobs", json=PING)
                    ok = response.status_code == 202
                else:
                    response = await client.get(f"/api/jobs/{job_ids[index % len(job_ids)]}")
                    ok = response.status_code == 200
                if not ok:
                    errors[f"{name} {response.status_code}"] = (
                        errors.get(f"{name} {response.status_code}", 0) + 1
                    )
            except httpx.HTTPError as exc:
                errors[f"{name} {type(exc).__name__}"] = errors.get(f"{name} {type(exc).__name__}", 0) + 1
            results[name].append(time.perf_counter() - scheduled)

        tasks = []
        start = time.perf_counter() + 0.1
        for index in range(total):
            scheduled = start + index / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(index, scheduled)))
        sent_for = time.perf_counter() - start
        await asyncio.gather(*tasks)
    return {"results": results, "errors": errors, "lags": lags, "sent_for": sent_for, "total": total}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="(a) POST /api/jobs requests")
    parser.add_argument("--concurrency", type=int, default=16, help="(a) concurrent clients")
    parser.add_argument("--batches", type=int, default=10, help="(b) batch requests")
    parser.add_argument("--batch-size", type=int, default=1000, help="(b) jobs per batch (at most 1000)")
    parser.add_argument("--rate", type=float, default=200, help="(c) requests per second offered")
    parser.add_argument("--duration", type=float, default=30, help="(c) seconds of offered load")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn --workers (WEB_CONCURRENCY)")
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/bench_api")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/12")
    args = parser.parse_args()

    setup_django(args.database_url, args.broker_url, LOG_LEVEL="WARNING")
    from django.contrib.auth import get_user_model

    from config.celery_app import app
    from jobs.models import Job
    from jobs.tokens import create_token

    app.control.purge()
    Job.objects.all().delete()
    user, _ = get_user_model().objects.update_or_create(username="bench-api", defaults={"is_staff": True})
    _, token = create_token(user, name="bench")
    headers = {"Authorization": f"Bearer {token}"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    log = Path(tempfile.gettempdir()) / "bench_api_gunicorn.log"
    gunicorn = Gunicorn(port, args.workers, log)

    def interrupted(signum: int, frame: Any) -> None:
        # Ctrl-C or `kill`: gunicorn goes first (it runs in its own session, so the terminal's SIGINT
        # does not reach it), then this unwinds through the finally below.
        if gunicorn.process.poll() is None:
            gunicorn.process.terminate()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        asyncio.run(wait_ready(base, headers, gunicorn))
        w = args.workers
        print(
            f"gunicorn config.wsgi --workers {w} (sync) on {base}; "
            f"PostgreSQL {args.database_url.rsplit('/', 1)[-1]}, "
            f"Redis {args.broker_url}; {os.cpu_count()} CPUs shared by gunicorn, PostgreSQL, Redis "
            f"and this load generator (httpx, asyncio, one process)"
        )
        asyncio.run(closed_loop(base, headers, 50, 4))  # warm-up: every worker imports the task modules

        h = asyncio.run(closed_loop(base, headers, args.requests, args.concurrency, path="/healthz"))
        print(
            f"(a0) GET /healthz: {args.requests / h['elapsed']:.0f} requests/s "
            f"(concurrency {args.concurrency}); "
            f"statuses {h['statuses']}"
        )
        a = asyncio.run(closed_loop(base, headers, args.requests, args.concurrency))
        a_ratio = (args.requests / a["elapsed"]) / (args.requests / h["elapsed"])
        print(
            f"(a) POST /api/jobs: {args.requests} jobs in {a['elapsed']:.2f} s = "
            f"{args.requests / a['elapsed']:.0f} jobs/s ({a_ratio:.2f}x /healthz) "
            f"(concurrency {args.concurrency}, {w} gunicorn workers); "
            f"latency {summary(a['latencies'])}; statuses {a['statuses']}"
        )

        b = asyncio.run(batches(base, headers, args.batches, args.batch_size))
        print(
            f"(b) POST /api/jobs/batch: {args.batches} x {args.batch_size} jobs "
            f"({b['accepted']} accepted) in "
            f"{b['elapsed']:.2f} s = {b['accepted'] / b['elapsed']:.0f} jobs/s (one client, sequential); "
            f"per request: mean {statistics.mean(b['latencies']) * 1000:.0f} ms, "
            f"min {min(b['latencies']) * 1000:.0f} ms, max {max(b['latencies']) * 1000:.0f} ms; "
            f"statuses {b['statuses']}"
        )

        c = asyncio.run(open_loop(base, headers, args.rate, args.duration, a["ids"] or ["0" * 32]))
        every = [value for values in c["results"].values() for value in values]
        late = sum(1 for lag in c["lags"] if lag > 0.01)
        print(
            f"(c) open loop, {args.rate:g} req/s offered for {args.duration:g} s ({c['total']} requests, "
            f"scheduled over {c['sent_for']:.1f} s; {late} started over 10 ms late, max "
            f"{max(c['lags'], default=0) * 1000:.0f} ms): "
            f"{sum(c['errors'].values())} errors {c['errors'] or ''}"
        )
        print(f"    answered, latency from the scheduled send time ({len(every)} requests):")
        print(f"    all:                {summary(every)}")
        for name, values in c["results"].items():
            print(f"    {name + ':':<20} {summary(values)}")

        master, workers = gunicorn.rss()
        print(
            f"(d) RSS after the run: gunicorn master {master / 2**20:.0f} MiB, workers "
            + ", ".join(f"{rss / 2**20:.0f} MiB" for rss in workers)
        )
        figures = {
            "healthz": {"requests_per_s": args.requests / h["elapsed"], "statuses": h["statuses"]},
            "single": {
                "jobs": args.requests,
                "concurrency": args.concurrency,
                "seconds": a["elapsed"],
                "jobs_per_s": args.requests / a["elapsed"],
                **latency(a["latencies"]),
                "statuses": a["statuses"],
            },
            "batch": {
                "requests": args.batches,
                "jobs_per_request": args.batch_size,
                "accepted": b["accepted"],
                "jobs_per_s": b["accepted"] / b["elapsed"],
                "mean_request_ms": statistics.mean(b["latencies"]) * 1000,
                "min_request_ms": min(b["latencies"]) * 1000,
                "max_request_ms": max(b["latencies"]) * 1000,
                "statuses": b["statuses"],
            },
            "open_loop": {
                "rate": args.rate,
                "duration_s": args.duration,
                "requests": c["total"],
                "answered": len(every),
                "errors": sum(c["errors"].values()),
                "error_kinds": c["errors"],
                "started_over_10ms_late": late,
                "max_start_lag_ms": max(c["lags"], default=0) * 1000,
                **latency(every),
                "by_request": {
                    "post_jobs": latency(c["results"]["POST /api/jobs"]),
                    "get_job": latency(c["results"]["GET /api/jobs/{id}"]),
                },
            },
            "rss_mib": {"master": master / 2**20, "workers": [rss / 2**20 for rss in workers]},
        }
        write_results("api", figures, vars(args), database_url=args.database_url, redis_url=args.broker_url)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        gunicorn.stop()
        try:
            app.control.purge()
            print(f"queues purged; gunicorn stopped (log: {log})")
        except Exception as exc:
            print(f"could not purge the queues: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
