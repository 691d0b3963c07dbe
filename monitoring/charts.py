"""Server-rendered SVG charts: no JavaScript library, no CDN, works offline."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from django.utils import timezone
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from monitoring.stats import Bin

WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 760, 180, 44, 22, 8
TICKS = 5  # time labels under the chart: both ends and three between
COLOURS = {"succeeded": "#2e7d32", "failed": "#c62828", "retried": "#f9a825"}


def throughput_chart(bins: Sequence[Bin], *, title: str) -> SafeString:
    """Stacked bars per time bin: succeeded (green) and failed (red); retries as a yellow tick."""
    peak = max((b.succeeded + b.failed for b in bins), default=0) or 1
    plot_width, plot_height = WIDTH - LEFT - 4, HEIGHT - BOTTOM - TOP
    step = plot_width / max(len(bins), 1)
    bar = max(step - 1, 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="metrics-chart" role="img" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<line x1="{LEFT}" y1="{TOP + plot_height}" x2="{WIDTH - 4}" y2="{TOP + plot_height}" '
        'stroke="#999"/>',
        f'<text x="{LEFT - 4}" y="{TOP + 10}" text-anchor="end" font-size="11">{peak}</text>',
        f'<text x="{LEFT - 4}" y="{TOP + plot_height}" text-anchor="end" font-size="11">0</text>',
    ]
    for index, item in enumerate(bins):
        x = LEFT + index * step
        ok_height = plot_height * item.succeeded / peak
        bad_height = plot_height * item.failed / peak
        local = timezone.localtime(item.start)
        label = escape(
            f"{local:%Y-%m-%d %H:%M}: {item.succeeded} succeeded, {item.failed} failed, "
            f"{item.retried} retried"
        )
        parts.append(f'<g class="bin" data-succeeded="{item.succeeded}" data-failed="{item.failed}">')
        parts.append(f"<title>{label}</title>")
        base = TOP + plot_height
        if item.succeeded:
            parts.append(
                f'<rect x="{x:.1f}" y="{base - ok_height:.1f}" width="{bar:.1f}" height="{ok_height:.1f}" '
                f'fill="{COLOURS["succeeded"]}"/>'
            )
        if item.failed:
            parts.append(
                f'<rect x="{x:.1f}" y="{base - ok_height - bad_height:.1f}" width="{bar:.1f}" '
                f'height="{bad_height:.1f}" fill="{COLOURS["failed"]}"/>'
            )
        if item.retried:
            parts.append(
                f'<rect x="{x:.1f}" y="{base + 2}" width="{bar:.1f}" height="3" fill="{COLOURS["retried"]}"/>'
            )
        parts.append("</g>")
    parts.extend(time_axis(bins, plot_width))
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 (numbers and escaped labels only)


def time_axis(bins: Sequence[Bin], plot_width: float) -> list[str]:
    """Time labels from the first bin's start to the last bin's end, in the local time zone.

    With dates whenever the window crosses midnight (24 h, 7 d): times alone read backwards
    there ("14:40 … 14:16"). The last label names the time zone.
    """
    if not bins:
        return []
    width = bins[1].start - bins[0].start if len(bins) > 1 else timedelta(0)
    start, end = bins[0].start, bins[-1].start + width
    dated = timezone.localtime(start).date() != timezone.localtime(end).date()
    parts = []
    for index in range(TICKS):
        fraction = index / (TICKS - 1)
        at = timezone.localtime(start + (end - start) * fraction)
        text = f"{at:%b} {at.day} {at:%H:%M}" if dated else f"{at:%H:%M}"
        if index == TICKS - 1:
            text += f" {at:%Z}"
        x = LEFT + plot_width * fraction
        anchor = "start" if index == 0 else "end" if index == TICKS - 1 else "middle"
        parts.append(
            f'<line x1="{x:.1f}" y1="{HEIGHT - BOTTOM}" x2="{x:.1f}" y2="{HEIGHT - BOTTOM + 4}" '
            'stroke="#999"/>'
        )
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{HEIGHT - 6}" text-anchor="{anchor}" font-size="11">'
            f"{escape(text)}</text>"
        )
    return parts
