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

from tests.project_copy import copy_project

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
        ("JOBS_RETRY_EMAIL", "13,10", "JOBS_RETRY_EMAIL='13,10' is not a retry policy"),
        ("JOBS_RETRY_IMAGES", "0,1,2", "JOBS_RETRY_IMAGES='0,1,2': attempts must be 1-100"),
        ("JOBS_RETRY_DATA_SYNC", "5,60,10", "base and cap are seconds with 0.01 <= base <= cap"),
        # Replaced by the policies: refused rather than silently ignored.
        ("JOBS_MAX_ATTEMPTS", "5", "JOBS_MAX_ATTEMPTS is no longer read: set JOBS_RETRY_DEFAULT"),
    ],
)
def test_a_bad_value_fails_at_start_up_naming_the_variable(variable: str, value: str, message: str) -> None:
    result = load_settings(DJANGO_SECRET_KEY="s" * 50, **{variable: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert message in result.stderr


DOT_ENV_PROBE = """
import json, os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
from django.conf import settings
print(json.dumps({"SECRET_KEY": settings.SECRET_KEY, "DB_NAME": str(settings.DATABASES["default"]["NAME"])}))
"""


@pytest.fixture
def project_with_dot_env(tmp_path: Path) -> Path:
    """A copy of the project with a .env such as `bin/run` writes (never the checkout's own .env)."""
    project = copy_project(tmp_path / "project")
    (project / ".env").write_text(
        "DJANGO_DEBUG=true\nDJANGO_SECRET_KEY=from-the-dot-env\nDATABASE_URL=sqlite:////tmp/from-dot-env.sqlite3\n"
    )
    return project


def run_in(project: Path, **variables: str) -> dict[str, str]:
    # A new terminal: PATH and HOME, nothing about the project exported.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **variables}
    probe = [sys.executable, "-c", DOT_ENV_PROBE]
    result = subprocess.run(probe, cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_settings_read_the_dot_env_file_and_the_environment_wins(project_with_dot_env: Path) -> None:
    assert run_in(project_with_dot_env) == {
        "SECRET_KEY": "from-the-dot-env",
        "DB_NAME": "/tmp/from-dot-env.sqlite3",
    }
    assert run_in(project_with_dot_env, DJANGO_SECRET_KEY="exported")["SECRET_KEY"] == "exported"


def test_a_dot_env_file_is_not_read_when_turned_off(project_with_dot_env: Path) -> None:
    result = run_in(project_with_dot_env, DJANGO_READ_DOT_ENV_FILE="false", DJANGO_DEBUG="true")
    assert result["SECRET_KEY"] != "from-the-dot-env"
    assert result["DB_NAME"] == str(project_with_dot_env / "db.sqlite3")


def test_the_test_settings_never_read_a_stray_dot_env_file(project_with_dot_env: Path) -> None:
    # Even with the switch exported on: a developer's .env must not send the tests to their stack.
    result = run_in(
        project_with_dot_env,
        DJANGO_SETTINGS_MODULE="config.settings.test",
        DJANGO_READ_DOT_ENV_FILE="true",
        CELERY_BROKER_URL="redis://127.0.0.1:6390/0",
    )
    assert result["SECRET_KEY"] == "test-only-secret-key-not-for-production"
    assert result["DB_NAME"] == str(project_with_dot_env / "db.sqlite3")
