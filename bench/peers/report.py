"""Medians with their spread, the ratios the issue's goals are stated in, and the printed table."""

from __future__ import annotations

import statistics
from typing import Any

# Figure name -> where it is in one run's figures (bench.peers.harness.measure).
FIGURES: dict[str, tuple[str, ...]] = {
    "enqueue_per_s": ("enqueue_per_s",),
    "batch_per_s": ("batch_per_s",),
    "apply_async_batch_per_s": ("apply_async_batch_per_s",),
    "durable_per_s": ("durable_per_s",),
    "drain_jobs_per_s": ("drain_jobs_per_s",),
    "paced_per_s": ("paced", "rate_sent"),
    "wait_p50_ms": ("paced", "wait_p50_ms"),
    "wait_p95_ms": ("paced", "wait_p95_ms"),
    "wait_p99_ms": ("paced", "wait_p99_ms"),
    "wait_max_ms": ("paced", "wait_max_ms"),
    "worker_rss_mib": ("worker_rss_mib",),
    "scaling_1_jobs_per_s": ("scaling_jobs_per_s", "1"),
    "scaling_2_jobs_per_s": ("scaling_jobs_per_s", "2"),
    "scaling_4_jobs_per_s": ("scaling_jobs_per_s", "4"),
}


def _at(run: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = run
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) else None


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One system: its runs as measured, and per figure the median and [min, max] of the runs that have it."""
    measured = [run for run in runs if "error" not in run]
    out: dict[str, Any] = {"runs": runs, "repetitions": len(measured), "failed": len(runs) - len(measured)}
    for name, path in FIGURES.items():
        values = [value for run in measured if (value := _at(run, path)) is not None]
        if values:
            out[name] = statistics.median(values)
            out[f"{name}_range"] = [min(values), max(values)]
    if measured:
        out["settings"] = measured[0].get("settings", {})
        out["paced_started"] = sum(run.get("paced", {}).get("started", 0) for run in measured)
        out["paced_jobs"] = sum(run.get("paced", {}).get("jobs", 0) for run in measured)
    return out


def ratios(systems: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Medians against medians, in the same run: what the issue's goals are written in."""

    def figure(system: str, name: str) -> float | None:
        value = systems.get(system, {}).get(name)
        return float(value) if value else None

    out: dict[str, float] = {}
    project = figure("project", "drain_jobs_per_s")
    for peer in ("celery", "dramatiq", "huey"):
        other = figure(peer, "drain_jobs_per_s")
        if project and other:
            out[f"project_drain_vs_{peer}"] = project / other
    off = figure("project_monitoring_off", "drain_jobs_per_s")
    if project and off:
        out["monitoring_cost_percent"] = (off - project) / off * 100
    watched = figure("project_flower", "drain_jobs_per_s")
    if project and watched:
        out["task_events_cost_percent"] = (project - watched) / project * 100
    rabbit = figure("project_rabbitmq", "drain_jobs_per_s")
    if project and rabbit:
        out["rabbitmq_drain_vs_redis"] = rabbit / project
    return out


def _number(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _spread(figures: dict[str, Any], name: str, spec: str = ",.0f") -> str:
    if name not in figures:
        return "-"
    low, high = figures[f"{name}_range"]
    text = _number(figures[name], spec)
    return text if figures["repetitions"] < 2 else f"{text} [{_number(low, spec)}-{_number(high, spec)}]"


def table(systems: dict[str, dict[str, Any]], labels: dict[str, str]) -> str:
    """The printed table: one row per system, medians [min-max]."""
    header = (
        "system",
        "enqueue/s, 1 client",
        "batch enqueue/s",
        "drain jobs/s",
        "wait p50 / p95 / p99 ms (at jobs/s)",
        "worker RSS MiB",
        "drain 1 / 2 / 4 processes",
    )
    rows = [header]
    for name, figures in systems.items():
        if not figures.get("repetitions"):
            rows.append((labels.get(name, name), "failed", "", "", "", "", ""))
            continue
        waits = "/".join(_number(figures.get(f"wait_{q}_ms"), ".1f") for q in ("p50", "p95", "p99"))
        scaling = " / ".join(_number(figures.get(f"scaling_{n}_jobs_per_s")) for n in (1, 2, 4))
        rows.append(
            (
                labels.get(name, name),
                _spread(figures, "enqueue_per_s"),
                _spread(figures, "batch_per_s"),
                _spread(figures, "drain_jobs_per_s"),
                f"{waits} ({_number(figures.get('paced_per_s'))})",
                _number(figures.get("worker_rss_mib")),
                scaling if "scaling_1_jobs_per_s" in figures or "scaling_4_jobs_per_s" in figures else "-",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def notes(systems: dict[str, dict[str, Any]], found: dict[str, float]) -> list[str]:
    """The figures that have no column: the project's other enqueue paths, the ratios, failures."""
    lines = []
    project = systems.get("project", {})
    if "apply_async_batch_per_s" in project:
        batched = _spread(project, "apply_async_batch_per_s")
        lines.append(
            f"project enqueue: apply_async in one producer batch {batched}/s; "
            f"durable enqueue() one at a time {_spread(project, 'durable_per_s')}/s"
        )
    names = {
        "project_drain_vs_celery": "project drain / stock Celery",
        "project_drain_vs_dramatiq": "project drain / Dramatiq",
        "project_drain_vs_huey": "project drain / Huey",
        "rabbitmq_drain_vs_redis": "project drain on RabbitMQ / on Redis",
    }
    parts = [f"{label} {found[key]:.2f}x" for key, label in names.items() if key in found]
    if "monitoring_cost_percent" in found:
        parts.append(f"monitoring costs {found['monitoring_cost_percent']:+.1f}% of the drain rate")
    if parts:
        lines.append("; ".join(parts))
    for name, figures in systems.items():
        for run in figures.get("runs", []):
            if "error" in run:
                lines.append(f"{name}: a run failed: {run['error'].splitlines()[0][:200]}")
    return lines
