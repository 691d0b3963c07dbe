"""The settings module loads with and without each variable, and fails fast on bad values.

Each case runs `config.settings.base` in a fresh interpreter with a controlled
environment, exactly as a process starting up would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import json
from config.settings import base as s
print(json.dumps({
    "DEBUG": s.DEBUG, "ALLOWED_HOSTS": s.ALLOWED_HOSTS, "TIME_ZONE": s.TIME_ZONE,
    "ENGINE": s.DATABASES["default"]["ENGINE"], "DB_NAME": str(s.DATABASES["default"]["NAME"]),
    "BROKER": s.CELERY_BROKER_URL, "EMAIL_BACKEND": s.EMAIL_BACKEND,
    "EMAIL_HOST": getattr(s, "EMAIL_HOST", None), "SENTRY_DSN": s.SENTRY_DSN,
    "SECURE_COOKIES": s.SESSION_COOKIE_SECURE,
}))
"""
VARIABLES = [
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "DJANGO_SECRET_KEY",
    "DJANGO_DEBUG",
    "DJANGO_ALLOWED_HOSTS",
    "TIME_ZONE",
    "EMAIL_URL",
    "SENTRY_DSN",
    "FLOWER_BASIC_AUTH",
    "LOG_LEVEL",
    "CELERY_TASK_SOFT_TIME_LIMIT",
    "CELERY_TASK_TIME_LIMIT",
    "CELERY_BROKER_VISIBILITY_TIMEOUT",
    "DELIVERY_HEARTBEAT_INTERVAL",
    "DELIVERY_HEARTBEAT_LAPSE",
]


def load_settings(**variables: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in VARIABLES}
    env.update(variables)
    return subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def loaded(**variables: str) -> dict[str, object]:
    result = load_settings(**variables)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_with_only_a_secret_key_everything_has_a_safe_local_default() -> None:
    settings = loaded(DJANGO_SECRET_KEY="s" * 50)
    assert settings["DEBUG"] is False
    assert settings["ENGINE"] == "django.db.backends.sqlite3"
    assert str(settings["DB_NAME"]).endswith("db.sqlite3")
    assert settings["BROKER"] == "redis://127.0.0.1:6390/0"  # where bin/run starts the embedded broker
    assert settings["EMAIL_BACKEND"] == "django.core.mail.backends.console.EmailBackend"
    assert settings["TIME_ZONE"] == "UTC"
    assert settings["SENTRY_DSN"] == ""
    assert settings["SECURE_COOKIES"] is True


def test_the_secret_key_is_required_when_debug_is_off() -> None:
    result = load_settings()
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY must be set" in result.stderr


def test_debug_mode_runs_without_a_secret_key_and_with_plain_http_cookies() -> None:
    settings = loaded(DJANGO_DEBUG="true")
    assert settings["DEBUG"] is True
    assert settings["SECURE_COOKIES"] is False


def test_every_variable_is_read_when_set() -> None:
    settings = loaded(
        DJANGO_SECRET_KEY="s" * 50,
        DATABASE_URL="postgres://app@db.internal:5432/jobs",
        CELERY_BROKER_URL="redis://broker.internal:6379/2",
        DJANGO_ALLOWED_HOSTS="jobs.example.com,admin.example.com",
        TIME_ZONE="Europe/Berlin",
        EMAIL_URL="smtp+tls://mailer:pw@smtp.example.com:587",
        SENTRY_DSN="https://public@sentry.example.com/1",
    )
    assert settings["ENGINE"] == "django.db.backends.postgresql"
    assert settings["BROKER"] == "redis://broker.internal:6379/2"
    assert settings["ALLOWED_HOSTS"] == ["jobs.example.com", "admin.example.com"]
    assert settings["TIME_ZONE"] == "Europe/Berlin"
    assert settings["EMAIL_HOST"] == "smtp.example.com"
    assert settings["SENTRY_DSN"] == "https://public@sentry.example.com/1"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DJANGO_DEBUG", "sometimes", "DJANGO_DEBUG='sometimes' is not a boolean"),
        ("DATABASE_URL", "oracle+nope://x", "DATABASE_URL has an unsupported database scheme"),
        ("CELERY_BROKER_URL", "sqs://queue", "CELERY_BROKER_URL=sqs://... is not a supported broker URL"),
        ("EMAIL_URL", "carrier-pigeon://coop", "EMAIL_URL is not a valid email URL"),
        ("SENTRY_DSN", "not a dsn", "SENTRY_DSN is not a valid Sentry DSN"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL='LOUD' is not one of"),
        ("CELERY_TASK_SOFT_TIME_LIMIT", "soon", "CELERY_TASK_SOFT_TIME_LIMIT='soon' is not an integer"),
        ("CELERY_BROKER_VISIBILITY_TIMEOUT", "60", "CELERY_BROKER_VISIBILITY_TIMEOUT=60 is too small"),
        # A lapse shorter than two missed heartbeats would take a busy worker for a dead one.
        ("DELIVERY_HEARTBEAT_LAPSE", "10", "DELIVERY_HEARTBEAT_LAPSE=10 is too small"),
    ],
)
def test_a_bad_value_fails_at_start_up_naming_the_variable(variable: str, value: str, message: str) -> None:
    result = load_settings(DJANGO_SECRET_KEY="s" * 50, **{variable: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert message in result.stderr
