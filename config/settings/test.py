"""Settings for the test suite: the base settings plus speed-ups that change no behaviour."""

from __future__ import annotations

import os
import tempfile

# The .env that `bin/run` writes points at a development stack: tests never read it, so a stray
# one cannot send them to another database or broker (forced: an exported value cannot either).
os.environ["DJANGO_READ_DOT_ENV_FILE"] = "false"
os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-secret-key-not-for-production")
# Retries in tests run the production policies (the same attempts, the same growth to the cap) with
# every wait scaled down: email's hour-long window takes seconds.
os.environ.setdefault("JOBS_RETRY_DELAY_SCALE", "0.001")
# A sync's page retries too: hundredths of a second (a test that honours a real Retry-After raises it).
os.environ.setdefault("DATA_SYNC_PAGE_RETRY_SECONDS", "0.01")
os.environ.setdefault("DATA_SYNC_PAGE_RETRY_MAX_SECONDS", "0.05")

# A worker a test starts on RabbitMQ keeps the shared counters (rate limits, metrics) in the tests'
# Redis (REDIS_URL), as a deployment names one with METRICS_REDIS_URL; without one, per process.
if not os.environ.get("CELERY_BROKER_URL", "").startswith(("redis", "valkey")):
    if os.environ.get("REDIS_URL"):
        os.environ.setdefault("METRICS_REDIS_URL", os.environ["REDIS_URL"])
    else:
        os.environ.setdefault("RATE_LIMIT_STORAGE_URL", "memory://")

from config.settings.base import *  # noqa: F403
from config.settings.base import DATABASES

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Mail sent by code under test is captured unless a test points EMAIL_* at its own SMTP server (in
# this process), or EMAIL_URL at it (for a worker process it starts).
if not os.environ.get("EMAIL_URL"):
    EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not :memory:, so worker subprocesses started by the tests see the same database.
    DATABASES["default"]["TEST"] = {
        "NAME": os.environ.get(
            "TEST_SQLITE_PATH", os.path.join(tempfile.gettempdir(), f"jobs-test-{os.getpid()}.sqlite3")
        )
    }
