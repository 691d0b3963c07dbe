"""bin/run's checks and files, without running the stack: taken ports, the .env it writes."""

from __future__ import annotations

import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from localdev.embedded_broker import free_port
from localdev.stack import taken_ports, write_dot_env


@pytest.fixture
def listening() -> Iterator[int]:
    """A port some other server is listening on."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def test_a_taken_web_port_is_named_with_the_variable_that_moves_it(listening: int) -> None:
    env = {"WEB_BIND": f"127.0.0.1:{listening}", "FLOWER_PORT": str(free_port())}

    [problem] = taken_ports(env, embedded_broker=False)

    assert f"port {listening} on 127.0.0.1 (web) is already in use" in problem
    assert "Stop it, or choose another port: WEB_BIND=127.0.0.1:" in problem
    suggested = int(problem.rsplit(":", 1)[1].split()[0])
    assert suggested != listening


def test_taken_flower_and_broker_ports_are_named(listening: int) -> None:
    env = {
        "WEB_BIND": f"127.0.0.1:{free_port()}",
        "FLOWER_PORT": str(listening),
        "EMBEDDED_BROKER_PORT": str(listening),
    }

    problems = taken_ports(env, embedded_broker=True)

    assert len(problems) == 2
    assert "(Flower)" in problems[0] and "FLOWER_PORT=" in problems[0]
    assert "(the embedded broker)" in problems[1] and "EMBEDDED_BROKER_PORT=" in problems[1]
    # With a broker of one's own (CELERY_BROKER_URL) the embedded broker's port does not matter.
    assert len(taken_ports(env, embedded_broker=False)) == 1


def test_free_ports_pass() -> None:
    env = {
        "WEB_BIND": f"127.0.0.1:{free_port()}",
        "FLOWER_PORT": str(free_port()),
        "EMBEDDED_BROKER_PORT": str(free_port()),
    }
    assert taken_ports(env, embedded_broker=True) == []


def test_the_dot_env_holds_what_another_terminal_needs_and_only_its_owner_can_read_it(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    env = {
        "DJANGO_DEBUG": "true",
        "DJANGO_SECRET_KEY": "s3cret",
        "DATABASE_URL": "sqlite:////somewhere/db.sqlite3",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6390/0",
        "FLOWER_URL": "http://127.0.0.1:5555",
        "EMAIL_URL": "smtp://127.0.0.1:1025",
        "DJANGO_SUPERUSER_PASSWORD": "not for the file",
        "PATH": "/usr/bin",
    }

    assert write_dot_env(env, path) is True

    values = dict(line.split("=", 1) for line in path.read_text().splitlines() if not line.startswith("#"))
    assert values == {
        "DJANGO_DEBUG": "true",
        "DJANGO_SECRET_KEY": "s3cret",
        "DATABASE_URL": "sqlite:////somewhere/db.sqlite3",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6390/0",
        "FLOWER_URL": "http://127.0.0.1:5555",
        "EMAIL_URL": "smtp://127.0.0.1:1025",
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The next bin/run rewrites its own file.
    assert write_dot_env({**env, "CELERY_BROKER_URL": "redis://127.0.0.1:6391/0"}, path) is True
    assert "CELERY_BROKER_URL=redis://127.0.0.1:6391/0" in path.read_text()


def test_a_dot_env_that_bin_run_did_not_write_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("DJANGO_SECRET_KEY=mine\n")

    assert write_dot_env({"DJANGO_SECRET_KEY": "the stack's"}, path) is False
    assert path.read_text() == "DJANGO_SECRET_KEY=mine\n"
