"""Emails per second through one SMTP connection to a local SMTP server.

    .venv/bin/python -m bench.email_smtp [--messages 2000] [--database-url postgres://...]
        [--redis-url redis://...]

Starts an aiosmtpd server on loopback, then sends N messages three ways, one
SMTP connection each: (1) pre-rendered messages straight through Django's SMTP
backend (the transport's ceiling), (2) `send_batch` as a newsletter batch runs
it (render, the EmailLog rows written per chunk of messages, rate limiter in memory),
(3) the same with the global rate limiter in Redis (REDIS_URL, default the local Redis).
Prints messages/s, per-message latency percentiles, how many times faster the backend
alone was than each send_batch run (`backend_over_batch`; the goal is at most 2) and
peak RSS, and writes them to docs/results/email.json.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support import ensure_database, write_results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--database-url", default=f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/9"))
    options = parser.parse_args()

    ensure_database(options.database_url)
    os.environ.update(
        DJANGO_SETTINGS_MODULE="config.settings.base",
        DJANGO_DEBUG="1",
        DATABASE_URL=options.database_url,
        CELERY_BROKER_URL=options.redis_url,
        LOG_LEVEL="WARNING",
    )
    import django

    django.setup()
    from aiosmtpd.controller import Controller
    from django.core.mail import get_connection
    from django.core.management import call_command
    from django.test.utils import override_settings

    from localdev.embedded_broker import free_port
    from tasks.models import EmailLog
    from tasks.services import email as service

    call_command("migrate", verbosity=0)
    EmailLog.objects.all().delete()

    class Counter:
        received = 0

        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            Counter.received += 1
            return "250 OK"

    port = free_port()
    controller = Controller(Counter(), hostname="127.0.0.1", port=port)
    controller.start()
    smtp = {
        "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_PORT": port,
        "EMAIL_USE_TLS": False,
        "EMAIL_USE_SSL": False,
        "EMAIL_HOST_USER": "",
        "EMAIL_HOST_PASSWORD": "",
    }
    n = options.messages
    recipients = [f"reader{i}@example.com" for i in range(n)]
    print(f"SMTP server 127.0.0.1:{port}; {n} messages per run; database {django.db.connection.vendor}")

    figures: dict[str, Any] = {"database": django.db.connection.vendor, "messages": n}

    def report(label: str, seconds: float, latencies: list[float], key: str) -> None:
        cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
        figures[key] = {
            "messages_per_s": n / seconds,
            "p50_ms": cuts[49] * 1000,
            "p95_ms": cuts[94] * 1000,
            "p99_ms": cuts[98] * 1000,
        }
        print(
            f"{label:<44} {n / seconds:8.0f} msg/s   p50 {cuts[49] * 1000:6.2f} ms   "
            f"p95 {cuts[94] * 1000:6.2f} ms   p99 {cuts[98] * 1000:6.2f} ms"
        )

    with override_settings(**smtp):
        messages = [
            service.build_message(to, "newsletter", {"body": "Hello"}, f"raw:{to}") for to in recipients
        ]
        connection = get_connection(fail_silently=False)
        connection.open()
        latencies = []
        started = time.perf_counter()
        for message in messages:
            t0 = time.perf_counter()
            connection.send_messages([message])
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
        connection.close()
        report("1. SMTP backend only (pre-rendered)", elapsed, latencies, "smtp_backend")

        for label, key, limiter in (
            (
                "2. send_batch, limiter in memory",
                "send_batch_memory_limiter",
                service.SendRateLimiter("1000000/second", "memory://"),
            ),
            (
                "3. send_batch, global limiter in Redis",
                "send_batch_redis_limiter",
                service.SendRateLimiter("1000000/second", options.redis_url),
            ),
        ):
            EmailLog.objects.all().delete()
            stamps: list[float] = []
            started = time.perf_counter()
            outcome = service.send_batch(
                campaign=f"bench-{label[0]}",
                template="newsletter",
                recipients=recipients,
                context={"title": "Bench", "body": "Hello"},
                limiter=limiter,
                on_progress=lambda *_, stamps=stamps: stamps.append(time.perf_counter()),
            )
            elapsed = time.perf_counter() - started
            assert outcome.sent == n, outcome
            per_message = [elapsed / n] * 2
            if len(stamps) > 2:  # progress fires every 10 messages: latency per message from the gaps
                per_message = [(b - a) / 10 for a, b in itertools.pairwise(stamps)]
            report(label, elapsed, per_message, key)

    controller.stop()
    # The goal (issue 18): send_batch within 2x of the SMTP backend alone, in the same run.
    raw = figures["smtp_backend"]["messages_per_s"]
    for key in ("send_batch_memory_limiter", "send_batch_redis_limiter"):
        figures[key]["backend_over_batch"] = raw / figures[key]["messages_per_s"]
    print(
        "SMTP backend alone / send_batch: "
        f"{figures['send_batch_memory_limiter']['backend_over_batch']:.2f}x (limiter in memory), "
        f"{figures['send_batch_redis_limiter']['backend_over_batch']:.2f}x (limiter in Redis), goal <= 2x"
    )
    print(f"received by the server: {Counter.received} (expected {3 * n})")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    figures["received"] = Counter.received
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_results(
        "email", figures, vars(options), database_url=options.database_url, redis_url=options.redis_url
    )


if __name__ == "__main__":
    main()
