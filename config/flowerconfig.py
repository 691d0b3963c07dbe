"""Flower's configuration file (`celery -A config flower --conf=config/flowerconfig.py`).

Flower applies FLOWER_* environment variables first and this file after, so
every value here is read from the environment too. Flower refuses to start
without basic auth, and listens on loopback unless FLOWER_ADDRESS says otherwise:
Flower 2.2 keeps its own /metrics and /healthcheck open even with basic auth.
"""

import os

_credentials = [item.strip() for item in os.environ.get("FLOWER_BASIC_AUTH", "").split(",") if item.strip()]
if not _credentials or not all(
    ":" in item and item.split(":", 1)[0].strip() and item.split(":", 1)[1] for item in _credentials
):
    raise SystemExit(
        "FLOWER_BASIC_AUTH must be set to user:password, both non-empty (comma-separate several); "
        "Flower will not start without authentication."
    )

basic_auth = _credentials
address = os.environ.get("FLOWER_ADDRESS", "127.0.0.1")
port = int(os.environ.get("FLOWER_PORT", "5555"))
# Keep task and worker history across Flower restarts, saved every minute.
persistent = True
db = os.environ.get("FLOWER_DB", os.path.join(".run", "flower"))
os.makedirs(os.path.dirname(db) or ".", exist_ok=True)
state_save_interval = 60_000
max_tasks = int(os.environ.get("FLOWER_MAX_TASKS", "10000"))
# Workers send task events only while asked (CELERY_WORKER_SEND_TASK_EVENTS is off by default):
# Flower broadcasts `enable_events` every 5 s while it runs, and a worker that stops hearing it turns
# them off again after a minute (monitoring/watchers.py). Flower's default, said here on purpose.
enable_events = True
# Forget workers that have been offline for a day.
purge_offline_workers = 24 * 3600
