"""Tasks that exist only for routing tests: each reports which queue delivered it.

Worker processes load them with `-I tests.probes`.
"""

from __future__ import annotations

from typing import Any

from config.celery_app import app


def _where(task: Any) -> dict[str, str]:
    info = task.request.delivery_info or {}
    return {"task": task.name, "routing_key": info.get("routing_key", ""), "worker": task.request.hostname}


@app.task(bind=True, name="email.probe")
def email_probe(self: Any) -> dict[str, str]:
    return _where(self)


@app.task(bind=True, name="images.probe")
def images_probe(self: Any) -> dict[str, str]:
    return _where(self)


# --- Probes of the shared task policy (tasks/base.py) --------------------------

from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

from pydantic import BaseModel, Field  # noqa: E402

from tasks.base import JobTask, PermanentJobError, TransientJobError  # noqa: E402


class FlakySchema(BaseModel):
    fail_times: int = Field(ge=0, le=20)


@app.task(
    bind=True,
    base=JobTask,
    name="default.probe_flaky",
    schema=FlakySchema,
    idempotency="no side effects",
    max_attempts=3,
)
def probe_flaky(self: JobTask, fail_times: int) -> dict[str, Any]:
    """Fails transiently `fail_times` times, then succeeds (or runs out of attempts)."""
    self.report_progress(50, f"attempt {self.request.retries + 1}")
    if self.request.retries < fail_times:
        raise TransientJobError(f"attempt {self.request.retries + 1} of a flaky probe failed")
    return {"attempts": self.request.retries + 1}


class NeedsFileSchema(BaseModel):
    path: str


@app.task(
    bind=True, base=JobTask, name="default.probe_needs_file", schema=NeedsFileSchema, idempotency="reads only"
)
def probe_needs_file(self: JobTask, path: str) -> str:
    """Fails permanently until the file exists: a cause a person can fix, then replay."""
    if not Path(path).exists():
        raise PermanentJobError(f"{path} does not exist")
    return Path(path).read_text()


class SleepSchema(BaseModel):
    path: str
    seconds: float = Field(ge=0, le=60)


@app.task(
    bind=True, base=JobTask, name="default.probe_sleep", schema=SleepSchema, idempotency="appends a line"
)
def probe_sleep(self: JobTask, path: str, seconds: float) -> int:
    """Records the pid that runs it, then sleeps: a task to kill a worker under."""
    import os
    import time

    with open(path, "a") as handle:
        handle.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return len(Path(path).read_text().splitlines())


class Window(BaseModel):
    start: date
    days: int = Field(ge=1, le=366)


class ParsedSchema(BaseModel):
    window: Window
    fail_times: int = Field(ge=0, le=5)


@app.task(
    bind=True, base=JobTask, name="default.probe_parsed", schema=ParsedSchema, idempotency="no side effects"
)
def probe_parsed(self: JobTask, window: Window, fail_times: int) -> str:
    """Receives a parsed model (not JSON) and retries: the retry must re-send the JSON it came with."""
    assert isinstance(window, Window)
    if self.request.retries < fail_times:
        raise TransientJobError("again")
    return f"{window.start.isoformat()}+{window.days}"


# --- Probe of error reporting (config/sentry.py) ---------------------------------


class FailSchema(BaseModel):
    address: str
    api_token: str
    transient_failures: int = Field(default=0, ge=0, le=3)


@app.task(
    bind=True,
    base=JobTask,
    name="email.probe_fail",
    schema=FailSchema,
    idempotency="no side effects",
    masked=frozenset({"api_token"}),
)
def probe_fail(self: JobTask, address: str, api_token: str, transient_failures: int = 0) -> None:
    """Fails transiently `transient_failures` times, then for good, naming `address`; holds a secret."""
    smtp_password = api_token  # a frame variable Sentry would show, were it not scrubbed
    if self.request.retries < transient_failures:
        raise TransientJobError(f"mail server busy for {address}")
    raise PermanentJobError(f"mailbox {address} does not exist (signed in with {len(smtp_password)} chars)")


# --- Probe of the fault suite (tests/faults) ---------------------------------------


class EffectSchema(BaseModel):
    directory: str
    key: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    seconds: float = Field(default=0, ge=0, le=60)


@app.task(
    bind=True,
    base=JobTask,
    name="default.probe_effect",
    schema=EffectSchema,
    idempotency="a run that finds the key's marker makes no effect (check, then act: as real tasks do)",
)
def probe_effect(self: JobTask, directory: str, key: str, seconds: float = 0) -> str:
    """Logs every execution, then makes its effect unless an earlier run did: the fault suite's oracle."""
    import os
    import time

    with open(os.path.join(directory, "executions.log"), "a") as log:
        log.write(f"{key} {os.getpid()}\n")
    time.sleep(seconds)
    marker = os.path.join(directory, f"done-{key}")
    if os.path.exists(marker):
        return "already done"
    with open(os.path.join(directory, "effects.log"), "a") as effects:
        effects.write(f"{key}\n")
    open(marker, "w").close()
    return "done"


# --- Probe of delivery (delivery/redis.py) -----------------------------------------


@app.task(bind=True, name="default.probe_delivery")
def probe_delivery(self: Any, path: str, seconds: float) -> int:
    """Appends how it was delivered (pid, delivery count, redelivered), then sleeps: a task to kill under.

    Only the first delivery sleeps, so a redelivered copy finishes at once.
    """
    import json
    import os
    import time

    with open(path, "a") as handle:
        record = {
            "pid": os.getpid(),
            "delivery_count": getattr(self.request, "x_delivery_count", None),
            "redelivered": bool((self.request.delivery_info or {}).get("redelivered")),
        }
        handle.write(json.dumps(record) + "\n")
    if not record["redelivered"]:
        time.sleep(seconds)
    return len(Path(path).read_text().splitlines())


class CrashSchema(BaseModel):
    path: str


@app.task(bind=True, base=JobTask, name="default.probe_crash", schema=CrashSchema, idempotency="no effects")
def probe_crash(self: JobTask, path: str) -> None:
    """Logs its run, then SIGKILLs the pool process running it: a message that kills every worker."""
    import os
    import signal

    with open(path, "a") as log:
        log.write(f"{os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)
