"""A worker's log level: the command line's when it gives one, LOG_LEVEL otherwise."""

from __future__ import annotations

import pytest

from tasks.default import ping

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.mark.parametrize(
    ("argv", "given"),
    [
        (["celery", "-A", "config", "worker", "--loglevel=WARNING"], True),
        (["celery", "-A", "config", "worker", "-l", "INFO"], True),
        (["celery", "-A", "config", "worker", "-lDEBUG"], True),
        (["celery", "-A", "config", "worker", "-Q", "email", "--concurrency=2"], False),
    ],
)
def test_a_log_level_counts_only_when_the_command_line_gives_one(argv: list[str], given: bool) -> None:
    from config.celery_app import loglevel_on_command_line

    assert loglevel_on_command_line(argv) is given


def test_a_workers_loglevel_on_the_command_line_is_obeyed(worker_process) -> None:
    """`--loglevel=WARNING` drops Celery's per-task INFO lines (received, succeeded); without the
    flag, LOG_LEVEL decides (INFO in tests: the worker's "ready" line is there)."""
    logs = {}
    for node, level in (("quiet", ["--loglevel=WARNING"]), ("chatty", [])):
        # One worker at a time (and no in-process one in this module): it runs these pings.
        worker = worker_process(node, "-Q", "default", "--pool=solo", *level, wait=not level)
        results = [ping.apply_async() for _ in range(3)]
        assert all(result.get(timeout=60)["pong"] for result in results)
        worker.stop()
        logs[node] = worker.log.read_text()

    assert " INFO " not in logs["quiet"], logs["quiet"][-2000:]
    assert " ready." in logs["chatty"] and "succeeded in" in logs["chatty"]
