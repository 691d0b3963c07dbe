"""The first quick-start command: the whole stack from the Procfile, then Ctrl-C.

Runs `python -m localdev.stack` (what `bin/run` executes once its virtualenv is
ready) exactly as a developer does, in a fresh copy of the project (its own .run/,
SQLite file, .env and embedded broker), on free ports, then checks what a person
would check: the admin asks for a login and accepts the printed credentials,
Flower refuses strangers and shows both workers, a task goes through, the Celery
CLI and manage.py work from a second terminal with nothing exported, and Ctrl-C
leaves no process behind.
"""

from __future__ import annotations

import base64
import contextlib
import http.cookiejar
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from localdev.embedded_broker import free_port, is_listening
from tests.processes import alive, descendants
from tests.project_copy import copy_project

pytestmark = [
    pytest.mark.integration,
    pytest.mark.requires_redis_broker,  # `bin/run` starts its own Valkey, whatever the suite uses
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc"),
]

# Set by the test run itself (pytest-django, tests/services.py, config.settings.test), not by a developer.
NOT_IN_A_TERMINAL = {
    "DJANGO_SETTINGS_MODULE",
    "DJANGO_READ_DOT_ENV_FILE",
    "DJANGO_SECRET_KEY",
    "CELERY_BROKER_URL",
    "REDIS_URL",
    "DATABASE_URL",
    "JOBS_RETRY_DELAY_SCALE",
}


class Stack:
    def __init__(self, tmp: Path) -> None:
        # A fresh clone, once per test: .run/, db.sqlite3 and .env are written inside it.
        self.root = tmp / "project"
        if not self.root.exists():
            copy_project(self.root)
        self.web_port, self.flower_port, self.broker_port = free_port(), free_port(), free_port()
        self.log = tmp / "stack.log"
        env = {key: value for key, value in os.environ.items() if key not in NOT_IN_A_TERMINAL}
        env.update(
            EMBEDDED_BROKER_PORT=str(self.broker_port),
            WEB_BIND=f"127.0.0.1:{self.web_port}",
            WEB_CONCURRENCY="1",
            FLOWER_PORT=str(self.flower_port),
            CELERY_WORKER_CONCURRENCY="1",
        )
        self.env = env
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "localdev.stack"],
            cwd=self.root,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, like a terminal's foreground job
        )

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self, timeout: float = 120) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.output()
            if "stack ready" in text:
                found = re.search(r"admin:\s+\S+\s+user '([^']+)', password '([^']+)'", text)
                token = re.search(r"api:\s+\S+ \(same login\), token '([^']+)'", text)
                assert found and token, text
                return {"user": found[1], "password": found[2], "token": token[1]}
            if self.process.poll() is not None:
                raise AssertionError(f"the stack exited early:\n{text[-4000:]}")
            time.sleep(0.5)
        raise AssertionError(f"the stack was not ready in {timeout}s:\n{self.output()[-4000:]}")

    def ctrl_c(self, timeout: float = 60) -> int:
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        for pid in descendants(self.process.pid) | {self.process.pid}:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        self._log_file.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    running = Stack(tmp_path)
    yield running
    if running.process.poll() is None:
        running.kill()


def get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def log_into_admin(base: str, user: str, password: str) -> str:
    """Logs in through the real login form; returns the admin index page."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    form = opener.open(f"{base}/admin/login/?next=/admin/", timeout=10).read().decode()
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form)
    assert csrf, form
    body = urllib.parse.urlencode(
        {"csrfmiddlewaretoken": csrf[1], "username": user, "password": password, "next": "/admin/"}
    ).encode()
    with opener.open(f"{base}/admin/login/?next=/admin/", data=body, timeout=10) as response:
        return response.read().decode()


def test_the_stack_starts_serves_and_stops_cleanly_on_ctrl_c(stack: Stack) -> None:
    credentials = stack.wait_ready()
    web = f"http://127.0.0.1:{stack.web_port}"
    flower = f"http://127.0.0.1:{stack.flower_port}"

    # The admin is behind a login, and the printed credentials open it.
    status, page = get(f"{web}/admin/")
    assert status == 200 and "Log in" in page  # urllib followed the redirect to the login page
    assert "Site administration" in log_into_admin(web, credentials["user"], credentials["password"])

    # Flower refuses strangers and knows both workers.
    assert get(f"{flower}/api/workers")[0] == 401
    assert get(f"{flower}/api/workers", auth=("admin", "wrong"))[0] == 401
    status, workers = get(
        f"{flower}/api/workers?refresh=1", auth=(credentials["user"], credentials["password"])
    )
    assert status == 200
    assert "email@" in workers and "general@" in workers

    # A task goes through the embedded broker and a worker, its result kept in the database.
    ping = subprocess.run(
        [
            sys.executable,
            "-c",
            "from config.celery_app import app; import django; django.setup(); "
            "print(app.send_task('default.ping').get(timeout=30)['pong'])",
        ],
        cwd=stack.root,
        env={
            **stack.env,
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{stack.broker_port}/0",
            "DJANGO_DEBUG": "1",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ping.returncode == 0, ping.stderr
    assert ping.stdout.strip().startswith("general@")

    # The printed API token enqueues a job over HTTP, and a worker runs it.
    api = {"Authorization": f"Bearer {credentials['token']}", "Content-Type": "application/json"}
    request = urllib.request.Request(
        f"{web}/api/jobs", data=b'{"type": "default.ping", "payload": {}}', headers=api, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202
        job_id = json.loads(response.read())["id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        following = urllib.request.Request(f"{web}/api/jobs/{job_id}", headers=api)
        with urllib.request.urlopen(following, timeout=10) as response:
            job = json.loads(response.read())
        if job["status"] == "succeeded":
            break
        time.sleep(0.2)
    assert job["status"] == "succeeded" and job["result"]["pong"].startswith("general@"), job

    # Ready as a whole: database, broker, a worker on every queue, beat holding its lease.
    deadline = time.monotonic() + 30
    while (readiness := get(f"{web}/readyz"))[0] != 200 and time.monotonic() < deadline:
        time.sleep(1)
    assert readiness[0] == 200, readiness[1]

    everything = descendants(stack.process.pid)
    assert len(everything) >= 7  # broker, web (+ its worker), two workers, beat, Flower

    assert stack.ctrl_c() in (0, 130), stack.output()[-3000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(pid) for pid in everything):
        time.sleep(0.2)
    assert not [pid for pid in everything if alive(pid)], stack.output()[-3000:]
    assert not is_listening("127.0.0.1", stack.broker_port)
    assert "embedded broker stopped" in stack.output()


def test_the_stack_keeps_its_admin_password_across_restarts(stack: Stack, tmp_path: Path) -> None:
    first = stack.wait_ready()
    stack.ctrl_c()

    again = Stack(tmp_path)
    try:
        assert again.wait_ready() == first
    finally:
        again.kill()


def second_terminal(stack: Stack, *command: str, stdin: str | None = None, timeout: float = 60) -> str:
    """Runs a command as a new terminal would after `source .venv/bin/activate`: only PATH and HOME.

    The venv's tools (`celery`, `python`) come first on PATH; nothing about the project is
    exported, so everything must come from the .env `bin/run` wrote.
    """
    venv_bin = str(Path(sys.executable).parent)
    clean = {"PATH": os.pathsep.join([venv_bin, "/usr/bin", "/bin"]), "HOME": os.environ.get("HOME", "/tmp")}
    done = subprocess.run(
        list(command), cwd=stack.root, env=clean, input=stdin, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_a_second_terminal_with_nothing_exported_uses_the_running_stack(stack: Stack) -> None:
    stack.wait_ready()
    assert "another terminal: source" in stack.output()
    dot_env = (stack.root / ".env").read_text()
    assert f"CELERY_BROKER_URL=redis://127.0.0.1:{stack.broker_port}/0" in dot_env
    assert f"DATABASE_URL=sqlite:///{stack.root / 'db.sqlite3'}" in dot_env

    # The Celery CLI: send, fetch the result (the django-db backend needs Django set up first).
    task_id = second_terminal(stack, "celery", "-A", "config", "call", "default.ping").strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", task_id), task_id
    deadline = time.monotonic() + 30
    while "pong" not in (result := second_terminal(stack, "celery", "-A", "config", "result", task_id)):
        assert time.monotonic() < deadline, result
        time.sleep(0.5)
    assert "general@" in result

    pinged = second_terminal(stack, "celery", "-A", "config", "inspect", "ping")
    assert "email@" in pinged and "general@" in pinged and "pong" in pinged
    assert "2 nodes online" in second_terminal(stack, "celery", "-A", "config", "status")
    assert "email@" in second_terminal(stack, "celery", "-A", "config", "control", "heartbeat")
    assert "purged" in second_terminal(stack, "celery", "-A", "config", "purge", "-f")
    asked = "print('has', 'email.send' in app.tasks)"
    assert "has True" in second_terminal(stack, "celery", "-A", "config", "shell", stdin=asked)
    # `events --dump` runs until interrupted: a few seconds of it, then SIGINT, as Ctrl-C would.
    venv_bin = str(Path(sys.executable).parent)
    dump = subprocess.Popen(
        ["celery", "-A", "config", "events", "--dump"],
        cwd=stack.root,
        env={"PATH": os.pathsep.join([venv_bin, "/usr/bin", "/bin"]), "HOME": os.environ.get("HOME", "/tmp")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    second_terminal(stack, "celery", "-A", "config", "call", "default.ping")
    time.sleep(3)
    dump.send_signal(signal.SIGINT)
    events, _ = dump.communicate(timeout=20)
    assert "starting capture" in events and "default.ping" in events, events

    # manage.py: the same SQLite file and secret key as the stack's.
    assert "no dead letters" in second_terminal(stack, "python", "manage.py", "deadletters", "list")
    token = second_terminal(stack, "python", "manage.py", "create_api_token", "admin", "--name=terminal 2")
    assert token.strip().startswith("jobs_")

    everything = descendants(stack.process.pid)
    assert stack.ctrl_c() in (0, 130), stack.output()[-3000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(pid) for pid in everything):
        time.sleep(0.2)
    assert not [pid for pid in everything if alive(pid)], stack.output()[-3000:]


def test_the_stack_names_a_taken_port_and_the_variable_to_change_before_starting_anything(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker_port = free_port()
        env = {key: value for key, value in os.environ.items() if key not in NOT_IN_A_TERMINAL}
        env.update(
            WEB_BIND=f"127.0.0.1:{port}", FLOWER_PORT=str(free_port()), EMBEDDED_BROKER_PORT=str(broker_port)
        )
        project = copy_project(tmp_path / "project")

        refused = subprocess.run(
            [sys.executable, "-m", "localdev.stack"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert refused.returncode == 1
    assert f"error: port {port} on 127.0.0.1 (web) is already in use" in refused.stderr
    assert "WEB_BIND=127.0.0.1:" in refused.stderr
    assert not is_listening("127.0.0.1", broker_port)  # nothing was started
    assert not (project / ".run" / "broker").exists()
