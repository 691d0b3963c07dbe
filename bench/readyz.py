"""Does /readyz hold the web tier? Latency of /healthz while clients loop on /readyz.

    .venv/bin/python -m bench.readyz [--clients 8] [--duration 20] [--workers 2]
        [--broker frozen|closed] [--database-url $DATABASE_URL] [--broker-url $REDIS_URL]

Starts `gunicorn config.wsgi` as the Procfile does (production settings, --workers W) on the
given PostgreSQL database and Redis broker, and one worker process consuming every queue, then:
(1) one client loops on /healthz alone for D seconds (the baseline);
(2) C clients loop on /readyz while one client loops on /healthz, for D seconds;
(3) staff, one at a time: GET /api/queues and GET /admin/metrics/ (20 each).
It prints p50/p99 of every series and how many /readyz answers the clients got.

`--broker frozen` points the web processes' broker reads (CELERY_BROKER_READ_URL) at a server that
accepts connections and never answers (a SIGSTOPped Redis), `--broker closed` at a closed port;
the worker keeps the real broker. The load generator runs on the same machine as everything else.
Writes the figures to docs/results/readyz.json (readyz-frozen.json, readyz-closed.json).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.api import Gunicorn, free_port, latency, summary  # noqa: E402
from bench.support import setup_django, write_results  # noqa: E402

ALL_QUEUES = "email,images,data_sync,analytics,default"


class FrozenBroker:
    """Accepts TCP connections and never answers a byte."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(512)
        self.port = int(self.listener.getsockname()[1])
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                return


async def loop_on(client: Any, path: str, until: float, into: list[float], statuses: dict[Any, int]) -> None:
    import httpx

    while time.monotonic() < until:
        began = time.perf_counter()
        try:
            key: Any = (await client.get(path)).status_code
        except httpx.HTTPError as exc:
            key = type(exc).__name__
        into.append(time.perf_counter() - began)
        statuses[key] = statuses.get(key, 0) + 1


async def phase(base: str, clients: int, duration: float) -> tuple[list[float], list[float], dict[Any, int]]:
    import httpx

    healthz: list[float] = []
    readyz: list[float] = []
    statuses: dict[Any, int] = {}
    until = time.monotonic() + duration
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        await asyncio.gather(
            loop_on(client, "/healthz", until, healthz, {}),
            *(loop_on(client, "/readyz", until, readyz, statuses) for _ in range(clients)),
        )
    return healthz, readyz, statuses


def timed_gets(base: str, path: str, headers: dict[str, str], cookies: dict[str, str], n: int) -> list[float]:
    import httpx

    samples = []
    with httpx.Client(base_url=base, headers=headers, cookies=cookies, timeout=60) as client:
        for _ in range(n):
            began = time.perf_counter()
            response = client.get(path)
            samples.append(time.perf_counter() - began)
            assert response.status_code == 200, (path, response.status_code, response.text[:300])
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8, help="clients looping on /readyz")
    parser.add_argument("--duration", type=float, default=20, help="seconds of each phase")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn --workers (WEB_CONCURRENCY)")
    parser.add_argument("--broker", choices=["up", "frozen", "closed"], default="up")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--broker-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/12"))
    args = parser.parse_args()
    if not args.database_url.startswith("postgres"):
        raise SystemExit("--database-url (or DATABASE_URL): a PostgreSQL database, as in production")

    # Plain HTTP on loopback: the session cookie must not be Secure for the staff login.
    setup_django(
        args.database_url, args.broker_url, METRICS_REDIS_URL=args.broker_url, DJANGO_SECURE_COOKIES="false"
    )
    import logging

    import httpx
    from django.contrib.auth import get_user_model

    logging.getLogger("httpx").setLevel(logging.WARNING)

    from config.celery_app import app
    from jobs.tokens import create_token
    from scheduling.lease import Lease

    user_model = get_user_model()
    user, _ = user_model.objects.update_or_create(username="bench-readyz", defaults={"is_staff": True})
    user.set_password("bench-readyz-pw")
    user.save()
    _, token = create_token(user, name="bench-readyz")
    Lease(duration=3600, renew_every=5).hold()  # a beat holds the lease: /readyz can be 200

    env_for_web = {}
    if args.broker == "frozen":
        frozen = FrozenBroker()
        env_for_web["CELERY_BROKER_READ_URL"] = f"redis://127.0.0.1:{frozen.port}/0"
    elif args.broker == "closed":
        env_for_web["CELERY_BROKER_READ_URL"] = f"redis://127.0.0.1:{free_port()}/0"

    log_dir = Path(tempfile.mkdtemp(prefix="bench_readyz_"))
    app.control.purge()
    import subprocess

    worker_log = (log_dir / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", ALL_QUEUES, "-n", "benchready@%h"],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    port = free_port()
    saved = dict(os.environ)
    os.environ.update(env_for_web)
    gunicorn = Gunicorn(port, args.workers, log_dir / "gunicorn.log")
    os.environ.clear()
    os.environ.update(saved)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if " ready." in (log_dir / "worker.log").read_text():
                break
            time.sleep(0.2)
        else:
            raise SystemExit(f"the worker did not start; see {log_dir / 'worker.log'}")
        while True:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        time.sleep(6)  # let the worker report itself, if it does
        first = httpx.get(f"{base}/readyz", timeout=60)
        print(f"/readyz now: {first.status_code} {first.text}")

        alone, _, _ = asyncio.run(phase(base, 0, args.duration))
        print(f"(1) /healthz alone:            {summary(alone)}  ({len(alone)} requests)")
        healthz, readyz, statuses = asyncio.run(phase(base, args.clients, args.duration))
        beside = f"beside {args.clients} /readyz loops"
        print(f"(2) /healthz {beside}: {summary(healthz)}  ({len(healthz)} requests)")
        print(
            f"    /readyz:                    {summary(readyz)}  "
            f"({len(readyz)} answers, {len(readyz) / args.duration:.0f}/s, {statuses})"
        )

        with httpx.Client(base_url=base) as browser:
            browser.get("/admin/login/")
            browser.post(
                "/admin/login/",
                data={
                    "username": "bench-readyz",
                    "password": "bench-readyz-pw",
                    "csrfmiddlewaretoken": browser.cookies["csrftoken"],
                    "next": "/admin/",
                },
                headers={"Referer": f"{base}/admin/login/"},
            )
            cookies = dict(browser.cookies)
        api = timed_gets(base, "/api/queues", {"Authorization": f"Bearer {token}"}, {}, 20)
        print(f"(3) GET /api/queues:            {summary(api)}")
        page = timed_gets(base, "/admin/metrics/?window=1h", {}, cookies, 20)
        print(f"    GET /admin/metrics/?window=1h: {summary(page)}")
        figures = {
            "broker": args.broker,
            "readyz_first_status": first.status_code,
            "healthz_alone": {"requests": len(alone), **latency(alone)},
            "healthz_beside_readyz": {"requests": len(healthz), **latency(healthz)},
            "readyz": {
                "answers": len(readyz),
                "answers_per_s": len(readyz) / args.duration,
                "statuses": {str(key): value for key, value in statuses.items()},
                **latency(readyz),
            },
            "api_queues": latency(api),
            "metrics_page_1h": latency(page),
        }
    finally:
        gunicorn.stop()
        worker.terminate()
        worker.wait(timeout=60)
        worker_log.close()
        app.control.purge()
    print(f"logs in {log_dir}")
    name = "readyz" if args.broker == "up" else f"readyz-{args.broker}"
    write_results(name, figures, vars(args), database_url=args.database_url, redis_url=args.broker_url)


if __name__ == "__main__":
    main()
