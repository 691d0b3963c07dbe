"""The Procfile is the contract for what runs in production and in `bin/run`."""

from __future__ import annotations

import runpy
import shlex
from pathlib import Path

import pytest
from honcho.environ import parse_procfile

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = parse_procfile((ROOT / "Procfile").read_text()).processes


def queues_of(command: str) -> set[str]:
    words = shlex.split(command)
    return set(words[words.index("-Q") + 1].split(","))


def test_it_has_release_web_workers_beat_and_flower() -> None:
    assert {"release", "web", "worker_email", "worker", "beat", "flower"} <= set(PROCESSES)
    assert "migrate" in PROCESSES["release"]


def test_the_email_worker_takes_the_email_queue_only() -> None:
    assert PROCESSES["worker_email"].startswith("celery -A config worker -Q email ")
    assert queues_of(PROCESSES["worker_email"]) == {"email"}


def test_every_queue_has_exactly_one_worker_line() -> None:
    from django.conf import settings

    consumed = [queue for name, cmd in PROCESSES.items() if " worker " in cmd for queue in queues_of(cmd)]
    assert sorted(consumed) == sorted(queue.name for queue in settings.CELERY_TASK_QUEUES)


def test_exactly_one_beat_runs_our_database_scheduler() -> None:
    beats = [cmd for cmd in PROCESSES.values() if " beat" in cmd]
    assert len(beats) == 1
    assert "-S scheduling.beat:Scheduler" in beats[0]


def test_flower_refuses_to_start_without_basic_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    with pytest.raises(SystemExit, match="FLOWER_BASIC_AUTH"):
        runpy.run_path(str(ROOT / "config" / "flowerconfig.py"))


@pytest.mark.parametrize("value", ["admin", "admin:", ":", "admin:secret,bob", ":secret", " :secret"])
def test_flower_refuses_credentials_without_a_user_or_a_password(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("FLOWER_BASIC_AUTH", value)
    with pytest.raises(SystemExit, match="FLOWER_BASIC_AUTH"):
        runpy.run_path(str(ROOT / "config" / "flowerconfig.py"))


def test_flower_listens_on_loopback_with_persistent_state(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "admin:secret")
    monkeypatch.setenv("FLOWER_DB", str(tmp_path / "flower"))
    monkeypatch.delenv("FLOWER_ADDRESS", raising=False)

    conf = runpy.run_path(str(ROOT / "config" / "flowerconfig.py"))

    assert conf["basic_auth"] == ["admin:secret"]
    assert conf["address"] == "127.0.0.1"
    assert conf["persistent"] is True
