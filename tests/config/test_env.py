"""The typed environment readers: good values parse, bad ones name the variable."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.env import Env, read_dot_env


@pytest.mark.parametrize(
    ("raw", "expected"), [("1", True), ("yes", True), ("On", True), ("0", False), ("false", False)]
)
def test_it_reads_booleans_in_the_usual_spellings(raw: str, expected: bool) -> None:
    assert Env({"FLAG": raw}).bool("FLAG", default=not expected) is expected


def test_it_refuses_a_boolean_it_cannot_read_and_names_the_variable() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"DJANGO_DEBUG='maybe' is not a boolean"):
        Env({"DJANGO_DEBUG": "maybe"}).bool("DJANGO_DEBUG", default=False)


def test_it_uses_the_default_when_a_variable_is_unset() -> None:
    env = Env({})
    assert env.bool("X", default=True) is True
    assert env.int("X", default=7) == 7
    assert env.list("X", default=["a"]) == ["a"]
    assert env.str("X", default="d") == "d"


def test_it_refuses_non_integers_and_out_of_range_integers() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"EMAIL_TIMEOUT='ten' is not an integer"):
        Env({"EMAIL_TIMEOUT": "ten"}).int("EMAIL_TIMEOUT", default=10)
    with pytest.raises(ImproperlyConfigured, match=r"EMAIL_TIMEOUT=0 is too small \(minimum 1\)"):
        Env({"EMAIL_TIMEOUT": "0"}).int("EMAIL_TIMEOUT", default=10, min_value=1)


def test_a_required_variable_that_is_missing_or_blank_is_named() -> None:
    for environ in ({}, {"DJANGO_SECRET_KEY": "  "}):
        with pytest.raises(ImproperlyConfigured, match="DJANGO_SECRET_KEY must be set"):
            Env(environ).str("DJANGO_SECRET_KEY", required=True)


def test_lists_are_comma_separated_and_trimmed() -> None:
    assert Env({"HOSTS": " a.example , b.example,, "}).list("HOSTS", default=[]) == ["a.example", "b.example"]


def test_database_urls_parse_into_django_settings() -> None:
    db = Env({"DATABASE_URL": "postgres://app:pw@db.internal:5433/jobs"}).database("DATABASE_URL", default="")
    assert (db["ENGINE"], db["HOST"], db["PORT"], db["NAME"], db["USER"]) == (
        "django.db.backends.postgresql",
        "db.internal",
        5433,
        "jobs",
        "app",
    )


def test_an_unknown_database_scheme_is_refused_by_name() -> None:
    with pytest.raises(ImproperlyConfigured, match="DATABASE_URL has an unsupported database scheme 'mongo'"):
        Env({"DATABASE_URL": "mongo://x/y"}).database("DATABASE_URL", default="")


def test_email_urls_configure_smtp_and_leave_unset_parts_to_django() -> None:
    email = Env({"EMAIL_URL": "smtp+tls://user:secret@smtp.example.com:587"}).email("EMAIL_URL", default="")
    assert email["EMAIL_BACKEND"] == "django.core.mail.backends.smtp.EmailBackend"
    assert (email["EMAIL_HOST"], email["EMAIL_PORT"], email["EMAIL_USE_TLS"]) == (
        "smtp.example.com",
        587,
        True,
    )
    console = Env({}).email("EMAIL_URL", default="consolemail://")
    assert "EMAIL_HOST" not in console


def test_broker_urls_must_be_redis_or_amqp() -> None:
    env = Env({"CELERY_BROKER_URL": "sqs://key@queue"})
    with pytest.raises(
        ImproperlyConfigured, match=r"CELERY_BROKER_URL=sqs://\.\.\. is not a supported broker URL"
    ):
        env.broker_url("CELERY_BROKER_URL", default="")
    valkey = Env({"CELERY_BROKER_URL": "valkey://127.0.0.1:6390/0"})
    assert valkey.broker_url("CELERY_BROKER_URL", default="") == "redis://127.0.0.1:6390/0"


def test_rates_are_checked() -> None:
    assert Env({"EMAIL_SEND_RATE": "600/minute"}).rate("EMAIL_SEND_RATE", default="1/second") == "600/minute"
    with pytest.raises(ImproperlyConfigured, match="EMAIL_SEND_RATE='fast' is not a rate"):
        Env({"EMAIL_SEND_RATE": "fast"}).rate("EMAIL_SEND_RATE", default="1/second")


def test_a_dot_env_file_adds_its_variables_and_the_environment_wins(tmp_path) -> None:
    dot_env = tmp_path / ".env"
    dot_env.write_text(
        "# written by bin/run\n"
        "\n"
        "DJANGO_DEBUG=true\n"
        "export DATABASE_URL=sqlite:////tmp/x.sqlite3\n"
        "DJANGO_SECRET_KEY='from the file'\n"
        'EMAIL_URL="consolemail://"\n'
    )
    environ = {"DJANGO_SECRET_KEY": "from the environment"}

    assert read_dot_env(dot_env, into=environ) is True
    assert environ == {
        "DJANGO_DEBUG": "true",
        "DATABASE_URL": "sqlite:////tmp/x.sqlite3",
        "DJANGO_SECRET_KEY": "from the environment",
        "EMAIL_URL": "consolemail://",
    }


def test_a_missing_dot_env_file_changes_nothing(tmp_path) -> None:
    environ: dict[str, str] = {}
    assert read_dot_env(tmp_path / ".env", into=environ) is False
    assert environ == {}


def test_a_line_in_a_dot_env_file_that_is_not_name_equals_value_is_named(tmp_path) -> None:
    dot_env = tmp_path / ".env"
    dot_env.write_text("DJANGO_DEBUG=true\nthis is not a setting\n")
    with pytest.raises(ImproperlyConfigured, match=r"\.env, line 2: not NAME=value: 'this is not a setting'"):
        read_dot_env(dot_env, into={})
