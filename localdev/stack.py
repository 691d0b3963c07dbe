"""Runs the whole stack for development (`bin/run` calls `python -m localdev.stack` in .venv).

1. an embedded broker (unless CELERY_BROKER_URL is set),
2. the Procfile's `release` step (migrations) and an admin user,
3. every other Procfile process under honcho: web, workers, beat, Flower.

Before starting anything it checks that the ports it needs are free, and names the
variable that moves one. It writes the values the stack runs with to .env (git ignores
it; the settings read it), so `celery -A config ...` and `python manage.py ...` in a
second terminal reach this stack with nothing exported.

Ctrl-C (or SIGTERM) stops the Procfile processes, then the broker. State that
must survive a restart (secret key, admin password, broker data, Flower's
database) lives in .run/, which git ignores.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from honcho.environ import parse_procfile
from honcho.manager import Manager

from localdev.embedded_broker import BrokerUnavailable, EmbeddedBroker

ROOT = Path(__file__).resolve().parent.parent
# Where state that must survive a restart lives; tests point it elsewhere.
STATE = Path(os.environ.get("STACK_STATE_DIR", ROOT / ".run"))

WORKER_NODES = ("email", "general")  # the -n names in the Procfile's worker lines

# Read by the settings (config/settings/base.py): what another terminal needs to reach this stack.
DOT_ENV = ROOT / ".env"
DOT_ENV_HEADER = "# Written by bin/run"
# Always written: what the stack itself decides (or was given).
DOT_ENV_STACK = ("DJANGO_DEBUG", "DJANGO_SECRET_KEY", "DATABASE_URL", "CELERY_BROKER_URL", "FLOWER_URL")
# Written when the terminal that started the stack set them: where the stack's data and services are.
DOT_ENV_PASSED_ON = (
    "MEDIA_ROOT",
    "TIME_ZONE",
    "EMAIL_URL",
    "RATE_LIMIT_STORAGE_URL",
    "METRICS_REDIS_URL",
    "DATA_SYNC_EXPORT_DIR",
)


def remembered_secret(name: str, length: int = 24) -> str:
    """A random value generated on first run and kept in .run/ (mode 600)."""
    path = STATE / name
    if not path.exists():
        path.write_text(secrets.token_urlsafe(length))
        path.chmod(0o600)
    return path.read_text().strip()


def prepare_environment() -> dict[str, str]:
    STATE.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("DJANGO_DEBUG", "true")
    env.setdefault("DJANGO_SECRET_KEY", remembered_secret("secret_key", 48))
    env.setdefault("DJANGO_SUPERUSER_USERNAME", "admin")
    env.setdefault("DJANGO_SUPERUSER_EMAIL", "admin@localhost")
    env.setdefault("DJANGO_SUPERUSER_PASSWORD", remembered_secret("admin_password", 12))
    env.setdefault(
        "FLOWER_BASIC_AUTH", f"{env['DJANGO_SUPERUSER_USERNAME']}:{env['DJANGO_SUPERUSER_PASSWORD']}"
    )
    env.setdefault("FLOWER_DB", str(STATE / "flower"))
    env.setdefault("FLOWER_URL", f"http://127.0.0.1:{env.get('FLOWER_PORT', '5555')}")
    env.setdefault("DATABASE_URL", f"sqlite:///{ROOT / 'db.sqlite3'}")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Procfile lines say `python`, `celery`, `gunicorn`: the ones installed beside this Python.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (as gunicorn, Flower and Valkey will)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def taken_ports(env: dict[str, str], *, embedded_broker: bool) -> list[str]:
    """One message per port the stack needs that something else holds, naming the variable to change."""
    web_host, _, web_port = env.get("WEB_BIND", "127.0.0.1:8000").rpartition(":")
    web_host = web_host or "127.0.0.1"
    flower_port = int(env.get("FLOWER_PORT", "5555"))
    # (what, host, port, the variable that moves it, how that variable is written for a port)
    needed = [
        ("web", web_host, int(web_port), "WEB_BIND", web_host + ":{}"),
        ("Flower", env.get("FLOWER_ADDRESS", "127.0.0.1"), flower_port, "FLOWER_PORT", "{}"),
    ]
    if embedded_broker:
        port = int(env.get("EMBEDDED_BROKER_PORT", "6390"))
        needed.append(("the embedded broker", "127.0.0.1", port, "EMBEDDED_BROKER_PORT", "{}"))
    problems = []
    for what, host, port, variable, shape in needed:
        if port_is_free(host, port):
            continue
        spare = next((p for p in range(port + 1, port + 50) if port_is_free(host, p)), port + 1)
        problems.append(
            f"port {port} on {host} ({what}) is already in use: another bin/run, or another server. "
            f"Stop it, or choose another port: {variable}={shape.format(spare)} bin/run"
        )
    return problems


def write_dot_env(env: dict[str, str], path: Path = DOT_ENV) -> bool:
    """Writes the values another terminal needs to reach this stack to .env (mode 600: the secret key).

    A .env that bin/run did not write is left alone (returns False): it is someone's own.
    """
    if path.exists() and not path.read_text().startswith(DOT_ENV_HEADER):
        return False
    lines = [
        f"{DOT_ENV_HEADER} at start-up: the stack's settings, so `celery -A config ...` and",
        "# `python manage.py ...` in another terminal reach it with nothing exported. Variables set in",
        "# the environment win. Rewritten by every bin/run; delete it (and .run/) to start afresh.",
    ]
    names = [*DOT_ENV_STACK, *(name for name in DOT_ENV_PASSED_ON if env.get(name))]
    lines += [f"{name}={env[name]}" for name in names if name in env]
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text("\n".join(lines) + "\n")
    return True


def run_release(env: dict[str, str], procfile: dict[str, str]) -> None:
    print(f"==> release: {procfile['release']}", flush=True)
    subprocess.run(procfile["release"], shell=True, check=True, env=env, cwd=ROOT)  # noqa: S602 (a Procfile line is a shell command)
    created = subprocess.run(
        [sys.executable, "manage.py", "createsuperuser", "--noinput"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if created.returncode != 0 and "already taken" not in created.stderr:
        sys.exit(f"could not create the admin user: {created.stderr.strip()}")
    env["STACK_API_TOKEN"] = api_token(env)


def api_token(env: dict[str, str]) -> str:
    """The admin's API token for trying the API, kept in .run/api_token (mode 600).

    Made again when the kept one no longer works (a new database, or revoked in the admin).
    """
    path = STATE / "api_token"
    if path.exists():
        check = "import os, sys; from jobs.tokens import authenticate as a; sys.exit(not a(os.environ['T']))"
        kept = path.read_text().strip()
        works = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", check],
            env={**env, "T": kept},
            cwd=ROOT,
            capture_output=True,
        )
        if works.returncode == 0:
            return kept
    made = subprocess.run(
        [sys.executable, "manage.py", "create_api_token", env["DJANGO_SUPERUSER_USERNAME"], "--name=bin/run"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    path.write_text(made.stdout.strip())
    path.chmod(0o600)
    return made.stdout.strip()


def report_when_ready(env: dict[str, str], started: float, stop: threading.Event) -> None:
    """Prints the banner once web, Flower and every worker answer."""
    os.environ.update(env)
    from config.celery_app import app

    web = "http://" + env.get("WEB_BIND", "127.0.0.1:8000").replace("0.0.0.0", "127.0.0.1")  # noqa: S104
    flower = f"http://127.0.0.1:{env.get('FLOWER_PORT', '5555')}"
    pending = {"web", "flower", *WORKER_NODES}
    while pending and not stop.wait(1.0):
        for name, url in (("web", f"{web}/admin/login/"), ("flower", f"{flower}/healthcheck")):
            if name in pending:
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (our own http:// URLs)
                        if response.status == 200:
                            pending.discard(name)
                except OSError:
                    pass
        if pending & set(WORKER_NODES):
            replies = app.control.ping(timeout=1.0) or []
            for reply in replies:
                for node in reply:
                    pending.discard(node.split("@", 1)[0])
    if pending:
        return
    user, password = env["DJANGO_SUPERUSER_USERNAME"], env["DJANGO_SUPERUSER_PASSWORD"]
    activate = Path(sys.executable).parent / "activate"
    if activate.is_relative_to(ROOT):
        activate = activate.relative_to(ROOT)
    flower_user = env["FLOWER_BASIC_AUTH"].split(",")[0].split(":", 1)[0]
    print(
        "\n"
        f"==> stack ready in {time.monotonic() - started:.1f}s\n"
        f"    admin:  {web}/admin/   user {user!r}, password {password!r}\n"
        f"    metrics: {web}/admin/metrics/ (same login), health: {web}/healthz, {web}/readyz\n"
        f"    api:    {web}/api/docs (same login), token {env.get('STACK_API_TOKEN', '')!r}"
        f" (kept in {STATE.name}/api_token)\n"
        f"    flower: {flower}/   user {flower_user!r} (FLOWER_BASIC_AUTH; same password by default)\n"
        f"    broker: {env['CELERY_BROKER_URL']}\n"
        f"    another terminal: source {activate}, then `celery -A config call default.ping`,\n"
        "      `python manage.py ...`: they read this stack's settings from .env\n"
        "    Ctrl-C stops everything.\n",
        flush=True,
    )


def embedded_broker(env: dict[str, str], state: Path = STATE) -> EmbeddedBroker:
    """The broker `bin/run` starts when none is set: it keeps queued jobs across a restart (AOF)."""
    port = int(env.get("EMBEDDED_BROKER_PORT", "6390"))
    return EmbeddedBroker(port, state / "broker", persist=True)


def main() -> int:
    started = time.monotonic()
    env = prepare_environment()
    procfile = parse_procfile((ROOT / "Procfile").read_text()).processes

    problems = taken_ports(env, embedded_broker=not env.get("CELERY_BROKER_URL"))
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1

    broker: EmbeddedBroker | None = None
    if not env.get("CELERY_BROKER_URL"):
        broker = embedded_broker(env)
        try:
            broker.start()
        except BrokerUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        env["CELERY_BROKER_URL"] = broker.url
        print(f"==> embedded broker (Valkey) on {broker.url}, data in {broker.data_dir}", flush=True)

    if write_dot_env(env):
        print(f"==> {DOT_ENV.name}: this stack's settings, for commands in another terminal", flush=True)
    else:
        print(
            f"==> {DOT_ENV} was not written by bin/run: left as it is (commands in another terminal read "
            "it, not this stack's settings)",
            flush=True,
        )

    stop = threading.Event()
    try:
        run_release(env, procfile)
        manager = Manager()
        for name, command in procfile.items():
            if name != "release":
                manager.add_process(name, command, env=env, cwd=str(ROOT))
        threading.Thread(target=report_when_ready, args=(env, started, stop), daemon=True).start()
        manager.loop()
        return manager.returncode or 0
    except subprocess.CalledProcessError as exc:
        print(f"error: release step failed with exit code {exc.returncode}", file=sys.stderr)
        return exc.returncode
    except KeyboardInterrupt:
        return 130
    finally:
        stop.set()
        if broker is not None:
            broker.stop()
            print("==> embedded broker stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
