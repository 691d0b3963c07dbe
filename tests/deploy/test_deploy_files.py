"""The example production files in deploy/: settings that pass `check --deploy`, units systemd accepts.

The units name /srv/jobs (the checkout) and /srv/jobs/.venv; here they are pointed at this checkout
and its virtualenv, so that systemd can check every program they start.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

from config.env import read_dot_env

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").iterdir())
VENV_BIN = Path(sys.executable).parent


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file, each a list of (key, value): systemd allows a key more than once."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"a setting before any section: {line}"
        key, separator, value = line.partition("=")
        assert separator, f"not Key=value: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [value for name, value in section if name == key]


def here(text: str) -> str:
    """A unit pointed at this checkout and its virtualenv instead of /srv/jobs."""
    return text.replace("/srv/jobs/.venv/bin", str(VENV_BIN)).replace("/srv/jobs", str(ROOT))


def env_example(name: str) -> dict[str, str]:
    found: dict[str, str] = {}
    read_dot_env(DEPLOY / name, into=found)
    return found


def test_the_production_settings_example_passes_check_deploy_without_a_warning() -> None:
    env = env_example("jobs.env.example")
    assert env["DJANGO_SECRET_KEY"] == ""  # the example holds no secret: each deploy makes its own
    env["DJANGO_SECRET_KEY"] = secrets.token_urlsafe(50)
    env.update(PATH=os.environ["PATH"], HOME=os.environ.get("HOME", "/tmp"))

    checked = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "no issues" in checked.stdout


def test_the_development_defaults_do_not_pass_check_deploy() -> None:
    # The check above means something: the same command on bin/run's settings fails.
    env = {"PATH": os.environ["PATH"], "DJANGO_DEBUG": "true", "DJANGO_READ_DOT_ENV_FILE": "false"}
    checked = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode != 0
    assert "security.W018" in checked.stderr  # DEBUG


def test_the_worker_groups_take_every_queue_exactly_once() -> None:
    groups = {
        path.name: env_example(path.name)["WORKER_QUEUES"].split(",")
        for path in DEPLOY.glob("worker-*.env.example")
    }
    taken = [queue for queues in groups.values() for queue in queues]

    assert sorted(taken) == sorted(settings.TASK_QUEUES), groups


@pytest.mark.parametrize("unit", [path for path in UNITS if path.suffix == ".service"], ids=lambda p: p.name)
def test_every_service_starts_a_program_that_exists_from_the_checkout_with_the_shared_settings(
    unit: Path,
) -> None:
    sections = parse_unit(here(unit.read_text()))
    service = sections["Service"]

    assert values(sections["Unit"], "Description")
    assert values(service, "WorkingDirectory") == [str(ROOT)]
    assert "/etc/jobs/jobs.env" in values(service, "EnvironmentFile")
    assert values(service, "User") == ["jobs"]
    for command in values(service, "ExecStart"):
        program = Path(command.split()[0])
        assert program.is_absolute() and os.access(program, os.X_OK), command
    if unit.name != "jobs-release.service":  # a oneshot run by hand at each deploy
        assert values(sections["Install"], "WantedBy") == ["jobs.target"]
        assert values(sections["Unit"], "PartOf") == ["jobs.target"]


def test_workers_stop_with_a_warm_shutdown_that_outlasts_the_hard_time_limit() -> None:
    service = parse_unit((DEPLOY / "systemd" / "jobs-worker@.service").read_text())["Service"]

    # SIGTERM to the main process only (mixed): Celery's warm shutdown; the pool children finish.
    assert values(service, "KillSignal") == ["SIGTERM"]
    assert values(service, "KillMode") == ["mixed"]
    assert int(values(service, "TimeoutStopSec")[0]) > settings.CELERY_TASK_TIME_LIMIT


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    for unit in UNITS:
        (tmp_path / unit.name).write_text(here(unit.read_text()))
    names = [unit.name.replace("@.service", "@email.service") for unit in UNITS]

    verified = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--generators=no", *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Exit status 0 and nothing said: an unknown key or a bad specifier is only a warning.
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")
