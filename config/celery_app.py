"""The one Celery app, configured from Django settings (CELERY_ namespace)."""

from __future__ import annotations

import logging.config
import os
from typing import Any

from celery import Celery
from celery.signals import setup_logging

from delivery.redis import register as use_reliable_redis_transport

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
# redis:// and rediss:// broker URLs get kombu's Redis transport with atomic fetch, consumer
# heartbeats, a reaper, a delivery count and a quarantine (delivery/redis.py); publishing is kombu's.
use_reliable_redis_transport()

app = Celery("config")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Task modules are listed in CELERY_IMPORTS (a top-level `tasks` package is
# not found by autodiscovery); any Django app's own tasks.py still is.
app.autodiscover_tasks()
# Workers consume only while the database that records every job answers (by name: the
# step lives with the tasks, and is loaded only when a worker builds its consumer).
app.steps["consumer"].add("tasks.reliability:DatabaseGate")


@setup_logging.connect
def configure_logging_from_django(**kwargs: Any) -> None:
    """Celery's logging goes through Django's LOGGING instead of Celery's own setup."""
    from django.conf import settings

    logging.config.dictConfig(settings.LOGGING)
