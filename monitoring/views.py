"""The admin metrics page (/admin/metrics/) and the Prometheus endpoint (/metrics)."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from monitoring import charts, presence, stats
from tasks.models import DeadLetter

logger = logging.getLogger(__name__)

NOTHING = "\N{EN DASH}"  # shown for a figure with no data


def duration(seconds: float | None) -> str:
    if seconds is None:
        return NOTHING
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"
    return f"{seconds:.1f} s" if seconds < 100 else f"{seconds:.0f} s"


def summary(series: stats.Series, window: stats.WindowStats) -> dict[str, Any]:
    rate = series.success_rate
    return {
        "name": series.name,
        "queue": series.queue,
        "finished": series.finished,
        "per_minute": f"{window.per_minute(series):.2f}",
        "success_rate": NOTHING if rate is None else f"{rate * 100:.1f}%",
        "succeeded": series.succeeded,
        "failed": series.failed,
        "retried": series.retried,
        "revoked": series.revoked,
        "run": [duration(series.percentile("rt", q)) for q in (0.5, 0.95, 0.99)],
        "wait": [duration(series.percentile("wt", q)) for q in (0.5, 0.95, 0.99)],
    }


@require_GET
@never_cache
def metrics_page(request: HttpRequest) -> HttpResponse:
    started = time.perf_counter()
    window = request.GET.get("window", "24h")
    if window not in stats.WINDOWS:
        window = "24h"
    now = timezone.now()
    window_stats = stats.window_stats(now - stats.WINDOWS[window], now, bins=60)
    stats_ms = (time.perf_counter() - started) * 1000
    # Depths from the broker, workers as they last reported themselves: no broadcast, milliseconds.
    live = presence.live_queues()
    by_queue = {series.name: summary(series, window_stats) for series in window_stats.queues}
    for row in live["rows"]:
        row["stats"] = by_queue.get(row["name"])
    context = {
        **admin.site.each_context(request),
        "title": "Task metrics",
        "window": window,
        "windows": list(stats.WINDOWS),
        "stats": window_stats,
        "total": summary(window_stats.total, window_stats),
        "tasks": [summary(series, window_stats) for series in window_stats.tasks],
        "top_exceptions": window_stats.top_exceptions(),
        "chart": charts.throughput_chart(
            window_stats.bins, title=f"Tasks finished per bin over the last {window}: succeeded and failed"
        ),
        "live": live,
        "dead_letters_waiting": DeadLetter.objects.filter(replayed_at__isnull=True).count(),
        "flower_url": settings.FLOWER_URL.rstrip("/"),
        "refresh_seconds": settings.METRICS_PAGE_REFRESH_SECONDS,
        "stats_ms": stats_ms,
    }
    response = TemplateResponse(request, "monitoring/metrics.html", context)
    response.render()
    logger.debug("metrics page: %.0f ms (stats %.0f ms)", (time.perf_counter() - started) * 1000, stats_ms)
    return response


def bearer_token_matches(request: HttpRequest) -> bool:
    expected = settings.METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    # As bytes: compare_digest raises TypeError (a 500) on a str that is not ASCII, and a header
    # may hold any Latin-1 character.
    return (
        bool(expected)
        and scheme.lower() == "bearer"
        and hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), expected.encode())
    )


@require_GET
@never_cache
def prometheus_metrics(request: HttpRequest) -> HttpResponse:
    """Staff in a browser session, or a scraper with `Authorization: Bearer <METRICS_TOKEN>`."""
    user = request.user
    if not (bearer_token_matches(request) or (user.is_authenticated and user.is_active and user.is_staff)):
        response = HttpResponse("authentication required\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    from prometheus_client import CONTENT_TYPE_LATEST

    from monitoring.prometheus import exposition

    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)
