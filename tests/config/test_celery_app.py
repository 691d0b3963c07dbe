"""How the Celery app is configured: the choices production depends on."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from celery import Celery
from django.conf import settings

import tasks

FAMILIES = ("email", "images", "data_sync", "analytics")


def test_it_accepts_and_sends_json_only(celery_app: Celery) -> None:
    conf = celery_app.conf
    assert conf.accept_content == ["json"]
    assert conf.result_accept_content == ["json"]
    assert (conf.task_serializer, conf.result_serializer, conf.event_serializer) == ("json",) * 3


def test_it_loses_no_accepted_job_when_a_worker_dies(celery_app: Celery) -> None:
    conf = celery_app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is True
    assert conf.broker_connection_retry_on_startup is True


def test_the_visibility_timeout_outlasts_the_hard_time_limit(celery_app: Celery) -> None:
    conf = celery_app.conf
    assert conf.task_soft_time_limit < conf.task_time_limit
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit


def test_task_events_wait_for_flower_to_ask_for_them(celery_app: Celery) -> None:
    """Nothing of ours reads task events (monitoring counts through signals); Flower turns them on."""
    assert celery_app.conf.worker_send_task_events is False
    assert celery_app.conf.task_send_sent_event is False
    flower = (Path(__file__).resolve().parents[2] / "config" / "flowerconfig.py").read_text()
    assert re.search(r"^enable_events = True$", flower, re.MULTILINE)


def test_pool_processes_are_replaced_by_their_memory_not_after_a_task_count(celery_app: Celery) -> None:
    """Each replacement after N tasks stalled the worker 120-360 ms (issue 18); memory bounds them."""
    assert celery_app.conf.worker_max_tasks_per_child is None
    assert celery_app.conf.worker_max_memory_per_child > 0


def test_results_are_stored_in_the_database_with_an_expiry(celery_app: Celery) -> None:
    from django_celery_results.backends.database import DatabaseBackend

    assert celery_app.conf.result_backend == "tasks.backends:DatabaseBackend"
    assert celery_app.conf.result_expires > 0
    assert isinstance(celery_app.backend, DatabaseBackend)  # django-celery-results', outage-aware


def test_the_five_queues_are_declared_once(celery_app: Celery) -> None:
    assert sorted(celery_app.amqp.queues) == sorted([*FAMILIES, "default"])
    assert celery_app.conf.task_default_queue == "default"


@pytest.mark.parametrize(
    ("task_name", "queue"),
    [
        ("email.send", "email"),
        ("email.newsletter", "email"),
        ("images.process", "images"),
        ("data_sync.sync", "data_sync"),
        ("analytics.rollup", "analytics"),
        ("default.ping", "default"),
        ("celery.backend_cleanup", "default"),
        ("emailish.task", "default"),
    ],
)
def test_tasks_are_routed_by_name_prefix(celery_app: Celery, task_name: str, queue: str) -> None:
    route = celery_app.amqp.router.route({}, task_name)
    assert route["queue"].name == queue


def test_every_task_module_is_imported_by_workers() -> None:
    """Autodiscovery would not find modules of a top-level `tasks` package: each must be listed."""
    root = Path(tasks.__file__).parent
    defining_tasks = {
        "tasks." + ".".join(path.relative_to(root).with_suffix("").parts)
        for path in root.rglob("*.py")
        if re.search(r"^@app\.task", path.read_text(), re.MULTILINE)
    }
    assert defining_tasks <= set(settings.CELERY_IMPORTS)
    for family in FAMILIES:
        assert f"tasks.{family}" in settings.CELERY_IMPORTS


def test_the_imported_modules_register_their_tasks(celery_app: Celery) -> None:
    celery_app.loader.import_default_modules()
    for module in settings.CELERY_IMPORTS:
        importlib.import_module(module)
    assert "default.ping" in celery_app.tasks
    for name in celery_app.tasks:
        prefix = name.split(".", 1)[0]
        assert prefix in {*FAMILIES, "default", "celery"}, f"task {name} has no queue prefix"


@pytest.mark.django_db(transaction=True)
def test_the_result_backend_works_in_a_process_that_did_not_set_django_up() -> None:
    # `celery -A config call` / `result` (and any script that only imports the app) build the
    # django-db backend before anything sets Django up: that was AppRegistryNotReady.
    import os
    import subprocess
    import sys

    from tests.conftest import database_url_for_subprocess

    probe = "from config.celery_app import app; print(type(app.backend).__name__, app.AsyncResult('x').state)"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url_for_subprocess(),
    }
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["DatabaseBackend", "PENDING"]
