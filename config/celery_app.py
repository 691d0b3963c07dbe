"""The one Celery app, configured from Django settings (CELERY_ namespace)."""

from __future__ import annotations

import importlib
import logging.config
import math
import os
import sys
from datetime import datetime
from typing import Any

from celery import Celery
from celery.signals import before_task_publish, setup_logging

from delivery.redis import register as use_reliable_redis_transport

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
# redis:// and rediss:// broker URLs get kombu's Redis transport with atomic fetch, consumer
# heartbeats, a reaper, a delivery count and a quarantine (delivery/redis.py); publishing is kombu's.
use_reliable_redis_transport()


class JobsCelery(Celery):
    """Celery, with Django set up before the result backend is built.

    The backend (django-celery-results' models) needs Django's app registry. Workers, web and
    `manage.py` set Django up first; the Celery CLI (`celery -A config call`, `result`, ...)
    and a plain script that sends a task do not, and failed with AppRegistryNotReady. Setting
    Django up here, at the first use of the backend, covers all of them.
    """

    def _get_backend(self) -> Any:
        from django.apps import apps

        if not apps.ready and not apps.loading:
            import django

            django.setup()
        return super()._get_backend()  # type: ignore[misc]

    def send_task(  # type: ignore[override]
        self, name: str, args: Any = None, kwargs: Any = None, countdown: Any = None, **options: Any
    ) -> Any:
        """On quorum queues a countdown or ETA goes through Celery's native delayed delivery, which
        takes whole seconds: `int(countdown)`, and a ValueError for anything under one second (a
        retry's short wait, `countdown=0.5`), which failed the task. The delay is rounded *up* to
        whole seconds there, so a message never runs before the time it was given."""
        eta = options.get("eta")
        if (countdown or eta) and _quorum_queues():
            if eta is not None:
                if isinstance(eta, str):
                    eta = datetime.fromisoformat(eta)
                countdown = (eta - self.now()).total_seconds()
                options["eta"] = None
            countdown = math.ceil(countdown) if countdown > 0 else None
        return super().send_task(name, args, kwargs, countdown=countdown, **options)


def _quorum_queues() -> bool:
    from django.conf import settings

    return bool(getattr(settings, "RABBITMQ_QUORUM_QUEUES", False))


app = JobsCelery("config")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Task modules are listed in CELERY_IMPORTS (a top-level `tasks` package is
# not found by autodiscovery); any Django app's own tasks.py still is.
app.autodiscover_tasks()
# Workers consume only while the database that records every job answers (by name: the
# step is loaded only when a worker builds its consumer).
app.steps["consumer"].add("jobs.gate:DatabaseGate")


@before_task_publish.connect
def give_every_message_a_priority(properties: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """A message sent without a priority gets task_default_priority (5, the middle of 0-9).

    Task.apply_async already does (it reads the setting); this covers what is sent by name
    (app.send_task: beat's fallback, chord callbacks), which kombu's Producer would otherwise send
    as 0, the lowest, on Redis and RabbitMQ alike. The properties are those it is published with.
    """
    if properties is not None and properties.get("priority") is None:
        properties["priority"] = app.conf.task_default_priority


# RabbitMQ's dead-lettering history (Celery's own list, celery.app.task.X_DEATH_HEADERS).
DEAD_LETTERING_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)


@before_task_publish.connect
def drop_rabbitmqs_dead_lettering_history(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """A message sent again with the headers of one that came through native delayed delivery
    (a deferral while the database is away, a retry, a replay) must not carry its `x-death`: on a
    countdown, RabbitMQ versions before 4.0.1 (3.13 reproduced; 3.10 here did not) can see the same
    `celery_delayed_*` queue twice, take it for a dead-letter cycle and drop the message silently
    (celery/celery#9867). Celery strips
    them from its own retries; this covers every other path. The headers are those published."""
    if headers:
        for name in DEAD_LETTERING_HEADERS & headers.keys():
            del headers[name]


@setup_logging.connect
def configure_logging_from_django(loglevel: int | str | None = None, **kwargs: Any) -> None:
    """Celery's logging goes through Django's LOGGING instead of Celery's own setup.

    A level given on the command line (`celery -A config worker --loglevel=WARNING`) is obeyed: it
    sets the root logger's and Celery's loggers' levels, as Celery's own setup would. Without one,
    LOG_LEVEL decides (Celery's default, WARNING, would hide the worker's "ready" line)."""
    import copy

    from django.conf import settings

    config: dict[str, Any] = settings.LOGGING
    if loglevel is not None and loglevel_on_command_line(sys.argv):
        level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else str(loglevel).upper()
        config = copy.deepcopy(config)
        config.setdefault("root", {})["level"] = level
        config.setdefault("loggers", {}).setdefault("celery", {})["level"] = level
    logging.config.dictConfig(config)


def loglevel_on_command_line(argv: list[str]) -> bool:
    """Whether a celery command line gives -l/--loglevel (`-l INFO`, `-lINFO`, `--loglevel=INFO`)."""
    for arg in argv[1:]:
        if arg in ("-l", "--loglevel") or arg.startswith("--loglevel="):
            return True
        if arg.startswith("-l") and len(arg) > 2:
            return True
    return False


def import_task_modules() -> None:
    """Imports every task module (CELERY_IMPORTS), so `app.tasks` lists all of our tasks.

    Workers import them at start-up; web processes (the API, the schedule admin) call this. Not
    app.loader.import_default_modules(): its Django fixup runs the system checks, which call this.
    """
    for module in (*app.conf.imports, *app.conf.include):
        importlib.import_module(module)
