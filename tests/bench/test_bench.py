"""`python -m bench`: the one benchmark that puts this project beside stock Celery and its peers.

No number is checked here (tests never time anything): that the run works end to end, stops
what it started, and writes a results file that docs/benchmarks.md can render.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings

from bench import __main__ as bench_main
from bench import publish
from bench.__main__ import SYSTEMS, assemble, parse, results_params
from bench.peers import report
from bench.support import write_results

ROOT = Path(__file__).resolve().parents[2]


def a_run(drain: float, **changes: Any) -> dict[str, Any]:
    """One system's run as bench.peers.harness.measure returns it (figures only, made up)."""
    run: dict[str, Any] = {
        "enqueue_per_s": drain * 2,
        "batch_per_s": drain * 4,
        "enqueue_jobs": 1000,
        "drain_jobs_per_s": drain,
        "drain": {"jobs_per_s": drain, "done": 500, "backlog": 1000, "seconds": 5.0, "complete": False},
        "paced": {
            "rate_asked": drain / 2,
            "rate_sent": drain / 2,
            "jobs": 100,
            "started": 100,
            "wait_p50_ms": 2.0,
            "wait_p95_ms": 5.0,
            "wait_p99_ms": 9.0,
            "wait_max_ms": 12.0,
            "wait_mean_ms": 3.0,
        },
        "worker_rss_mib": 150.0,
        "scaling_jobs_per_s": {"1": drain / 2, "2": drain, "4": drain * 1.5},
        "settings": {"worker": "some worker", "celery": "5.7.0", "dramatiq": "2.2.1", "huey": "3.5.4"},
        "phase_seconds": {"enqueue": 4.0},
        "seconds": 30.0,
        "repetition": 1,
    }
    run.update(changes)
    return run


def recorded_runs() -> dict[str, list[dict[str, Any]]]:
    runs = {
        name: [a_run(100.0 * (index + 1) + repetition, repetition=repetition) for repetition in (1, 2, 3)]
        for index, name in enumerate(SYSTEMS)
    }
    for run in runs["project"]:  # the project's other enqueue paths are measured once, on Redis
        run.update(apply_async_batch_per_s=900.0, durable_per_s=300.0)
    return runs


def test_medians_come_with_the_spread_of_the_repetitions() -> None:
    runs = [a_run(100.0), a_run(300.0), a_run(200.0)]

    figures = report.summary(runs)

    assert figures["drain_jobs_per_s"] == 200.0
    assert figures["drain_jobs_per_s_range"] == [100.0, 300.0]
    assert figures["wait_p99_ms"] == 9.0
    assert figures["scaling_4_jobs_per_s"] == 300.0
    assert figures["repetitions"] == 3
    assert figures["failed"] == 0


def test_a_failed_run_is_kept_counted_and_left_out_of_the_medians() -> None:
    runs = [a_run(100.0), {"error": "Traceback ...\nWorkerFailed: the worker exited with 1", "repetition": 2}]

    figures = report.summary(runs)
    text = report.table({"celery": figures, "huey": report.summary([{"error": "boom"}])}, {})

    assert figures["drain_jobs_per_s"] == 100.0
    assert figures["failed"] == 1
    assert len(figures["runs"]) == 2
    assert re.search(r"^huey\s+failed$", text, re.MULTILINE)
    assert "celery: a run failed: Traceback ..." in report.notes({"celery": figures}, {})


def test_the_ratios_are_the_projects_drain_against_each_peer_monitoring_off_and_flower_watching() -> None:
    figures = assemble(recorded_runs(), elapsed=300.0)

    ratios = figures["ratios"]
    assert ratios["project_drain_vs_celery"] == pytest.approx(102 / 402)
    assert ratios["monitoring_cost_percent"] == pytest.approx((202 - 102) / 202 * 100)
    assert ratios["task_events_cost_percent"] == pytest.approx((102 - 302) / 102 * 100)
    assert ratios["rabbitmq_drain_vs_redis"] == pytest.approx(702 / 102)


def test_the_table_has_a_row_per_system_with_medians_and_ranges() -> None:
    figures = assemble(recorded_runs(), elapsed=300.0)

    text = report.table(figures["systems"], figures["labels"])

    lines = text.splitlines()
    assert len(lines) == 2 + len(SYSTEMS)
    assert lines[2].startswith("this project (Procfile worker, default.ping)")
    assert "102 [101-103]" in lines[2]
    assert "2.0/5.0/9.0 (51)" in lines[2]
    assert "51 / 102 / 153" in lines[2]


def test_the_benchmarks_page_renders_a_results_file_as_python_m_bench_writes_it(tmp_path: Path) -> None:
    # Every {{ path }} of the template's bench block must be in what the harness writes.
    params = results_params(parse([]))
    write_results("bench", assemble(recorded_runs(), elapsed=300.0), params, directory=tmp_path)

    page = publish.render(publish.TEMPLATE, tmp_path)

    section = page.split("\n## Bench\n", 1)[1].split("\n## ", 1)[0]
    assert "*Measured " in section
    assert "([`docs/results/bench.json`](results/bench.json))" in section
    assert "Not measured yet" not in section


def test_a_run_skips_its_scaling_drains_when_the_rest_would_not_fit_the_time_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bench_main, "STARTED", time.monotonic())
    runs = {
        name: [a_run(100.0, seconds=100.0, phase_seconds={"scaling": 40.0})] for name in ("project", "celery")
    }
    remaining = [(2, "project"), (2, "celery"), (3, "project")]

    # This run with its scaling drains (100 s), the two after it without theirs (60 s each).
    assert bench_main.scaling_fits(runs, remaining, budget=230.0)
    assert not bench_main.scaling_fits(runs, remaining, budget=210.0)
    assert bench_main.scaling_fits(runs, remaining, budget=0)  # no budget


def bench_database_url() -> str:
    """A database of the bench's own beside the test database (the bench empties its tables)."""
    db = settings.DATABASES["default"]
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}_bench"


@pytest.mark.integration
def test_a_quick_run_of_the_project_and_stock_celery_measures_both_and_stops_its_workers(
    tmp_path: Path,
) -> None:
    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        pytest.skip("python -m bench runs the project on PostgreSQL (it truncates the job tables)")
    broker = settings.CELERY_BROKER_URL
    if not broker.startswith("redis"):
        pytest.skip("python -m bench puts the project and stock Celery on Redis")
    parts = urlsplit(broker)
    db = parts.path.strip("/") or "0"  # this test process's own Redis database, for both systems
    base = parts._replace(path="").geturl()
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}

    done = subprocess.run(
        [
            *(sys.executable, "-m", "bench", "--quick", "--systems", "project,celery"),
            *(
                "--database-url",
                bench_database_url(),
                "--redis-url",
                base,
                "--redis-dbs",
                f"{db},{db},{db},{db}",
            ),
            *("--results-dir", str(tmp_path)),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^this project \(Procfile worker, default\.ping\)\s+[\d,]+", done.stdout, re.MULTILINE)
    assert re.search(r"^stock Celery \(defaults, no-op\)\s+[\d,]+", done.stdout, re.MULTILINE)
    assert re.search(r"^elapsed \d+ s", done.stdout, re.MULTILINE)
    results = json.loads((tmp_path / "bench.json").read_text())
    assert publish.missing_stamp(results) == []
    assert results["command"].startswith("python -m bench --quick")
    for name in ("project", "celery"):
        figures = results["figures"]["systems"][name]
        assert figures["repetitions"] == 1, figures["runs"]
        for figure in ("enqueue_per_s", "batch_per_s", "drain_jobs_per_s", "wait_p99_ms", "worker_rss_mib"):
            assert figures[figure] > 0, (name, figure)
        assert figures["paced_started"] == figures["paced_jobs"]
    assert results["figures"]["systems"]["project"]["settings"]["worker"].startswith(
        "celery -A config worker -Q default,images,data_sync,analytics -n general@%h"
    )
    # Every worker process group it started is gone.
    logs = Path(re.search(r"logs in (\S+)", done.stdout)[1])  # type: ignore[index]
    pids = [int(pid) for path in logs.glob("*/workers.pids") for pid in path.read_text().split()]
    assert pids
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
