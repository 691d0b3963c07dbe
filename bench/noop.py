"""A task that does nothing, for the collection-overhead benchmark (`-I bench.noop`)."""

from __future__ import annotations

from config.celery_app import app


@app.task(name="default.bench_noop", ignore_result=True)
def noop() -> None:
    return None


@app.task(name="default.bench_sentinel")
def sentinel() -> str:
    return "done"
