"""Settings shared by every environment, read from the environment.

Every variable read here is listed, with its default, in docs/configuration.md. Defaults
are safe and local; the only thing with no default outside DEBUG is the secret
key.
"""

from __future__ import annotations

import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from config import brokers
from config.env import Env, read_dot_env

BASE_DIR = Path(__file__).resolve().parent.parent.parent
env = Env()

# `bin/run` writes the values its stack runs with (debug, secret key, the SQLite file, the embedded
# broker) to .env, so `celery -A config ...` and `manage.py ...` in a second terminal reach that stack
# with nothing exported. Variables set in the environment win over the file; the test settings
# never read it, and production turns it off (deploy/jobs.env.example).
DOT_ENV_FILE = BASE_DIR / ".env"
if env.bool("DJANGO_READ_DOT_ENV_FILE", default=True):
    read_dot_env(DOT_ENV_FILE)

# --- Django core --------------------------------------------------------------

DEBUG = env.bool("DJANGO_DEBUG", default=False)
SECRET_KEY = (
    env.str("DJANGO_SECRET_KEY", default="django-insecure-local-development-only")
    if DEBUG
    else env.str("DJANGO_SECRET_KEY", required=True)
)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_TZ = True
LANGUAGE_CODE = "en-us"
USE_I18N = True

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "django_celery_results",
    # django-ninja's templates and bundled Swagger UI (served locally, no CDN) for /api/docs.
    "ninja",
    "tasks",
    "scheduling",
    "monitoring",
    "jobs",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        # Project pages that belong to no app (the front page).
        "DIRS": [BASE_DIR / "config" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
MEDIA_URL = "media/"
MEDIA_ROOT = Path(env.str("MEDIA_ROOT", default=str(BASE_DIR / "media")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# The admin's static files are served by WhiteNoise straight from the apps, so
# the stack works without a collectstatic step in development.
WHITENOISE_USE_FINDERS = True

# --- Database -----------------------------------------------------------------

DATABASES = {
    "default": env.database("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web, workers and beat are separate processes writing one file: WAL lets
    # readers run beside a writer, IMMEDIATE takes the write lock up front so
    # two writers queue (for `timeout` seconds) instead of failing mid-transaction.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
else:
    # Reuse connections for a minute; workers and web both benefit.
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60, min_value=0)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # An unreachable server is an error in seconds, not a hang (workers then stop consuming).
    DATABASES["default"].setdefault("OPTIONS", {})["connect_timeout"] = env.int(
        "DATABASE_CONNECT_TIMEOUT", default=5, min_value=1
    )

# Celery's Django fixup closes the connection before and after every task unless this is set (then
# every this many tasks only): workers keep theirs like web requests do instead, by CONN_MAX_AGE and
# CONN_HEALTH_CHECKS (jobs/connections.py). Without it each job opened a new PostgreSQL connection.
CELERY_DB_REUSE_MAX = 1000

# --- Security -----------------------------------------------------------------

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Behind HTTPS in production these must be on; DEBUG (local, plain HTTP) turns them off.
SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=not DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SESSION_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=0, min_value=0)
# Both commit every subdomain (preload: for months, in browsers' built-in lists) to HTTPS: off
# unless you say so (docs/deployment.md; `check --deploy` warns while they are off).
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("DJANGO_SECURE_HSTS_PRELOAD", default=False)
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=False)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# --- Email --------------------------------------------------------------------

# EMAIL_URL, e.g. smtp+tls://user:password@smtp.example.com:587 ; the default
# prints messages to the console so nothing leaves a development machine.
globals().update(env.email("EMAIL_URL", default="consolemail://"))
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=10, min_value=1)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="jobs@localhost")
SERVER_EMAIL = DEFAULT_FROM_EMAIL
ADMINS = [("Admin", address) for address in env.list("DJANGO_ADMINS", default=[])]
# Mail to ADMINS (alerts, server errors) starts with this.
EMAIL_SUBJECT_PREFIX = env.str("EMAIL_SUBJECT_PREFIX", default="[jobs] ")
# Messages per period for all workers together (newsletters), e.g. "10/second", "600/minute".
EMAIL_SEND_RATE = env.rate("EMAIL_SEND_RATE", default="10/second")

# --- Celery -------------------------------------------------------------------
# Read by config/celery_app.py through the CELERY_ namespace. Each choice says why.

# The run command starts an embedded Valkey on this address when no broker is set.
EMBEDDED_BROKER_URL = "redis://127.0.0.1:6390/0"
CELERY_BROKER_URL = env.broker_url("CELERY_BROKER_URL", default=EMBEDDED_BROKER_URL)
BROKER_IS_REDIS = CELERY_BROKER_URL.startswith(("redis://", "rediss://"))
# Shared counters (the API's enqueue rate, the global email send rate) live in Redis: the
# broker's when it is Redis. With RabbitMQ they need a Redis of their own: RATE_LIMIT_STORAGE_URL,
# by default METRICS_REDIS_URL; with neither set the settings refuse to load, since memory://
# would give every process its own window (N web processes: N times the rate). Set
# RATE_LIMIT_STORAGE_URL=memory:// explicitly for a single-process setup. (Not the database:
# a moving window is a write per request, and the limiter must answer while the database is slow.)
_SHARED_REDIS_URL = CELERY_BROKER_URL if BROKER_IS_REDIS else env.str("METRICS_REDIS_URL", default="")
RATE_LIMIT_STORAGE_URL = env.str("RATE_LIMIT_STORAGE_URL", default=_SHARED_REDIS_URL)
if not RATE_LIMIT_STORAGE_URL:
    raise ImproperlyConfigured(
        "RATE_LIMIT_STORAGE_URL: with a RabbitMQ broker (CELERY_BROKER_URL=amqp://...) the shared rate "
        "limits need a Redis: set METRICS_REDIS_URL or RATE_LIMIT_STORAGE_URL to redis://... "
        "(RATE_LIMIT_STORAGE_URL=memory:// keeps them per process: for one process only)."
    )
# Results live in the database (django-celery-results): they survive a broker
# restart or flush, and the API can list them with the ORM.
# (tasks.backends: django-celery-results' backend, which in a worker sends a message again
# for later instead of losing its outcome when the database is away.)
CELERY_RESULT_BACKEND = "tasks.backends:DatabaseBackend"
CELERY_CACHE_BACKEND = "django-cache"
# Store task name, args, queue and worker with the result, so a result row
# says what ran, not just its return value.
CELERY_RESULT_EXTENDED = True
# Results are kept a week, then `celery.backend_cleanup` (scheduled by beat) removes them.
CELERY_RESULT_EXPIRES = env.int("CELERY_RESULT_EXPIRES", default=7 * 24 * 3600, min_value=60)

# JSON only: pickle lets whoever can write to the broker run code in a worker.
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_RESULT_ACCEPT_CONTENT = ["json"]
CELERY_EVENT_SERIALIZER = "json"

# Acknowledge after the task ran, and give the message back if the worker
# process died: a killed worker loses no accepted job (tasks must be idempotent).
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# With acks_late, a task cut off by a lost broker connection would run twice
# (the broker redelivers it): cancel it instead and let the redelivery run it.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
# A worker that starts before the broker keeps trying instead of exiting.
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None

# Time limits: soft raises SoftTimeLimitExceeded in the task so it can clean
# up; hard kills the child process. No task may run unbounded.
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=10 * 60, min_value=1)
CELERY_TASK_TIME_LIMIT = env.int(
    "CELERY_TASK_TIME_LIMIT", default=CELERY_TASK_SOFT_TIME_LIMIT + 60, min_value=1
)
# Redis redelivers an unacknowledged message after the visibility timeout. It
# must exceed the hard time limit and the longest countdown/ETA (retry
# backoff), or a running or waiting task would be delivered twice.
CELERY_BROKER_VISIBILITY_TIMEOUT = env.int(
    "CELERY_BROKER_VISIBILITY_TIMEOUT", default=2 * 3600, min_value=CELERY_TASK_TIME_LIMIT + 1
)
# Seconds any broker command (a publish from the web, beat, the admin or a worker, an ack)
# may wait for the broker's answer, and to open a connection: a frozen or unreachable broker
# gives the caller an error instead of a hang. Workers' blocking BRPOP is not affected (kombu
# reads it from its event loop when the socket is readable; the server answers it every second).
CELERY_BROKER_SOCKET_TIMEOUT = env.float(
    "CELERY_BROKER_SOCKET_TIMEOUT", default=3.0, min_value=0.5, max_value=60
)
CELERY_BROKER_CONNECTION_TIMEOUT = CELERY_BROKER_SOCKET_TIMEOUT
# A publish that fails is tried once more (a pooled connection the broker closed in a restart
# is replaced), then the caller gets the error: at most about two socket timeouts in all.
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.2,
}
# Redis consumers fetch and record in-flight atomically (delivery/redis.py) and beat every
# DELIVERY_HEARTBEAT_INTERVAL seconds; one silent for DELIVERY_HEARTBEAT_LAPSE seconds is dead, and
# its in-flight messages go back to their queues within about lapse + interval seconds. The lapse
# must cover a few missed beats, so a busy machine does not look dead.
DELIVERY_HEARTBEAT_INTERVAL = env.int("DELIVERY_HEARTBEAT_INTERVAL", default=5, min_value=1, max_value=60)
DELIVERY_HEARTBEAT_LAPSE = env.int(
    "DELIVERY_HEARTBEAT_LAPSE", default=15, min_value=2 * DELIVERY_HEARTBEAT_INTERVAL + 1, max_value=600
)
# Priorities: 0-9, 9 runs first, on Redis and on RabbitMQ alike. A task sent without one (plain
# apply_async, beat, an API job without one) gets 5, the middle: higher numbers overtake it, lower
# ones wait behind it (config/celery_app.py also gives it to messages sent by name).
CELERY_TASK_DEFAULT_PRIORITY = 5
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": CELERY_BROKER_VISIBILITY_TIMEOUT,
    "consumer_heartbeat_interval": DELIVERY_HEARTBEAT_INTERVAL,
    "consumer_heartbeat_lapse": DELIVERY_HEARTBEAT_LAPSE,
    # Detect half-open connections (NAT, load balancers) instead of hanging.
    "health_check_interval": 25,
    "socket_keepalive": True,
    "socket_timeout": CELERY_BROKER_SOCKET_TIMEOUT,
    "socket_connect_timeout": CELERY_BROKER_SOCKET_TIMEOUT,
    # Redis: one list per priority 0-9, read 9 first (delivery/redis.py), as RabbitMQ orders them.
    "priority_steps": list(range(10)),
    # What delivery/redis.py files a message without a priority under (kombu's own is 0).
    "default_priority": CELERY_TASK_DEFAULT_PRIORITY,
    # A fetch takes as many messages as the worker has free prefetch slots (never more), in one round
    # trip, and carries the acks of the last event-loop turn (delivery/redis.py; issue 18).
    "fetch_batch_size": 64,
}
# RabbitMQ (config/brokers.py, docs/brokers.md): `quorum` (the default) declares every task queue
# as a quorum queue: replicated, with a delivery limit and a dead-letter exchange; RabbitMQ 3.10
# ignores priorities there. `classic` keeps classic queues, which order by priority (below) but
# are not replicated. A queue cannot change type in place (PRECONDITION_FAILED): see docs/brokers.md.
RABBITMQ_QUEUE_TYPE = env.choice("RABBITMQ_QUEUE_TYPE", default="quorum", choices=list(brokers.QUEUE_TYPES))
RABBITMQ_QUORUM_QUEUES = brokers.uses_quorum_queues(CELERY_BROKER_URL, RABBITMQ_QUEUE_TYPE)
# Classic queues: RabbitMQ orders by priority only in queues declared with x-max-priority (Redis
# ignores the argument). Off: queues are declared without it, as earlier versions did, and RabbitMQ
# ignores priorities. A queue that exists with other arguments cannot be declared again
# (PRECONDITION_FAILED): docs/api.md, Priorities, says how to migrate. Quorum queues: not used.
RABBITMQ_PRIORITY_QUEUES = env.bool("RABBITMQ_PRIORITY_QUEUES", default=True)
CELERY_TASK_QUEUE_MAX_PRIORITY = 9 if RABBITMQ_PRIORITY_QUEUES and not RABBITMQ_QUORUM_QUEUES else None
# Whether the broker runs a backlog highest priority first (GET /api/queues says so).
BROKER_ORDERS_BY_PRIORITY = BROKER_IS_REDIS or CELERY_TASK_QUEUE_MAX_PRIORITY is not None
if brokers.is_amqp(CELERY_BROKER_URL):
    # Publisher confirms on every channel (the API, apply_async, beat, the workers' retries): a
    # publish returns once RabbitMQ has the message (on a quorum queue: on a majority of its
    # replicas), and one it refuses (nack, unroutable exchange) raises instead of being lost.
    # Reads and writes give up after the socket timeout, the wait for a confirm included.
    CELERY_BROKER_TRANSPORT_OPTIONS.update(
        confirm_publish=True,
        read_timeout=CELERY_BROKER_SOCKET_TIMEOUT,
        write_timeout=CELERY_BROKER_SOCKET_TIMEOUT,
    )

# Task events only while someone watches (issue 18: they were 35% of a worker's main process, 2.6
# PUBLISH per job, and the "sent" event cost apply_async 40%). Nothing of ours reads them: the metrics
# page, Prometheus, alerts and the API count through signals (monitoring/collect.py). Flower turns a
# worker's task events on with its `enable_events` broadcast, every 5 s while it runs
# (config/flowerconfig.py); the client's "task-sent" stays off (Flower shows tasks from "received").
CELERY_WORKER_SEND_TASK_EVENTS = env.bool("CELERY_WORKER_SEND_TASK_EVENTS", default=False)
CELERY_TASK_SEND_SENT_EVENT = env.bool("CELERY_TASK_SEND_SENT_EVENT", default=False)
# Report STARTED so the API can tell "queued" from "running".
CELERY_TASK_TRACK_STARTED = True

# Our tasks are seconds to minutes long (SMTP, images, HTTP pages): a worker
# reserves one message per process so a slow task never holds others hostage.
CELERY_WORKER_PREFETCH_MULTIPLIER = env.int("CELERY_WORKER_PREFETCH_MULTIPLIER", default=1, min_value=1)
# One pool process per core this process may run on (a container's CPU set, not the host's count), as
# Celery's own default: it was a fixed 2, which left bigger machines idle (issue 18).
CELERY_WORKER_CONCURRENCY = env.int(
    "CELERY_WORKER_CONCURRENCY",
    default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
    min_value=1,
)
# Memory growth from Pillow and large payloads is bounded by max_memory_per_child (checked after every
# task): a pool process past it is replaced. Recycling every N tasks as well cost a 120-360 ms stall
# per recycle (issue 18) for no bound the memory limit does not give: off unless set. (Not "0 = off":
# the celery CLI also reads CELERY_WORKER_MAX_TASKS_PER_CHILD as --max-tasks-per-child, and 0 crashes
# the pool.)
CELERY_WORKER_MAX_TASKS_PER_CHILD = (
    env.int("CELERY_WORKER_MAX_TASKS_PER_CHILD", default=1, min_value=1)
    if os.environ.get("CELERY_WORKER_MAX_TASKS_PER_CHILD")
    else None
)
CELERY_WORKER_MAX_MEMORY_PER_CHILD = env.int(
    "CELERY_WORKER_MAX_MEMORY_PER_CHILD", default=512_000, min_value=10_000
)  # KiB
# Logging goes through Django's LOGGING (see config/celery_app.py).
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# --- Queues and routing: the one place that says what runs where. ------------

TASK_QUEUES = ("email", "images", "data_sync", "analytics", "default")
# Quorum queues: RabbitMQ dead-letters a message returned (its worker lost) more than this many
# times. A backstop: our own cap (JOBS_MAX_DELIVERIES, below) fires first, on delivery
# JOBS_MAX_DELIVERIES + 1, and leaves a dead letter with the arguments and the traceback; the
# margin covers that delivery's own worker dying too.
RABBITMQ_DELIVERY_LIMIT = env.int(
    "RABBITMQ_DELIVERY_LIMIT",
    default=env.int("JOBS_MAX_DELIVERIES", default=5, min_value=1, max_value=1000) + 2,
    # Below JOBS_MAX_DELIVERIES RabbitMQ would drop the message before our cap recorded it.
    min_value=env.int("JOBS_MAX_DELIVERIES", default=5, min_value=1, max_value=1000),
)
CELERY_TASK_QUEUES = brokers.task_queues(
    TASK_QUEUES,
    broker_url=CELERY_BROKER_URL,
    queue_type=RABBITMQ_QUEUE_TYPE,
    delivery_limit=RABBITMQ_DELIVERY_LIMIT,
)
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_DEFAULT_EXCHANGE = brokers.QUORUM_EXCHANGE if RABBITMQ_QUORUM_QUEUES else "default"
CELERY_TASK_DEFAULT_EXCHANGE_TYPE = "topic" if RABBITMQ_QUORUM_QUEUES else "direct"
CELERY_TASK_DEFAULT_ROUTING_KEY = "default"
# Quorum queues: Celery (5.5+) then turns off global QoS (quorum queues do not support it) and
# sends countdowns and ETAs through RabbitMQ's native delayed delivery (the `celery_delayed_*`
# exchanges and quorum queues its workers declare), so a delayed message waits in the broker, not
# unacknowledged in a worker. Longer delays than JOBS_BROKER_MAX_DELAY_SECONDS wait in the database.
CELERY_WORKER_DETECT_QUORUM_QUEUES = True
CELERY_BROKER_NATIVE_DELAYED_DELIVERY_QUEUE_TYPE = "quorum"
# Routing by task-name prefix; anything else goes to `default`.
CELERY_TASK_ROUTES = {f"{name}.*": {"queue": name, "routing_key": name} for name in TASK_QUEUES[:-1]}
# A typo in `-Q emial` or a route to an undeclared queue fails loudly rather
# than creating a queue nobody consumes.
CELERY_TASK_CREATE_MISSING_QUEUES = False

# Task modules live in the top-level `tasks` package, which autodiscovery
# (it imports `<app>.tasks`) would not find: list every family explicitly.
CELERY_IMPORTS = (
    "tasks.default",
    "tasks.email",
    "tasks.images",
    "tasks.data_sync",
    "tasks.analytics",
    "tasks.maintenance",
    "monitoring.tasks",
    "jobs.tasks",
)

# --- The shared task policy (tasks/base.py) -----------------------------------

# Retry policies (tasks/retries.py): each task family has its own attempts and backoff, chosen to
# ride out an outage of what it depends on. "attempts,base,cap" replaces a family's (unset: the
# family's own); retry n waits between ceiling/2 and ceiling, ceiling = min(cap, base * 2**n).
JOBS_RETRY_DEFAULT = env.retry_policy("JOBS_RETRY_DEFAULT")
JOBS_RETRY_EMAIL = env.retry_policy("JOBS_RETRY_EMAIL")
JOBS_RETRY_DATA_SYNC = env.retry_policy("JOBS_RETRY_DATA_SYNC")
JOBS_RETRY_ANALYTICS = env.retry_policy("JOBS_RETRY_ANALYTICS")
JOBS_RETRY_IMAGES = env.retry_policy("JOBS_RETRY_IMAGES")
# Multiplies every retry wait. 1 in production; the test settings make it small so that tests run
# the production attempt counts in seconds.
JOBS_RETRY_DELAY_SCALE = env.float("JOBS_RETRY_DELAY_SCALE", default=1.0, min_value=0.0001, max_value=10)
for _replaced, _by in (
    ("JOBS_MAX_ATTEMPTS", "JOBS_RETRY_DEFAULT (attempts,base,cap)"),
    ("JOBS_RETRY_BACKOFF_SECONDS", "JOBS_RETRY_DEFAULT (attempts,base,cap)"),
    ("JOBS_RETRY_BACKOFF_MAX_SECONDS", "JOBS_RETRY_DEFAULT (attempts,base,cap)"),
):
    if os.environ.get(_replaced):
        raise ImproperlyConfigured(f"{_replaced} is no longer read: set {_by} or a family's JOBS_RETRY_*.")
# A message delivered more often than this (its worker died each time: out of memory, a crash,
# the hard time limit) fails for good with a dead letter instead of going round for ever.
# Deferrals while the database is away and a task's own retries are not deliveries.
JOBS_MAX_DELIVERIES = env.int("JOBS_MAX_DELIVERIES", default=5, min_value=1, max_value=1000)
# Workers ask the database `SELECT 1` this often and consume only while it answers
# (tasks.reliability); a message whose outcome cannot be written is sent again for later.
JOBS_DATABASE_PROBE_SECONDS = env.float(
    "JOBS_DATABASE_PROBE_SECONDS", default=2.0, min_value=0.1, max_value=60
)
JOBS_DATABASE_PROBE_TIMEOUT_SECONDS = env.float(
    "JOBS_DATABASE_PROBE_TIMEOUT_SECONDS", default=3.0, min_value=0.5, max_value=60
)

CELERY_TIMEZONE = TIME_ZONE

# --- schedules and beat (scheduling/) -------------------------------------------

# django-celery-beat's DatabaseScheduler plus a lease, one key per occurrence, the
# missed-run policy and DST-safe cron (scheduling/beat.py).
CELERY_BEAT_SCHEDULER = "scheduling.beat:Scheduler"
# Beat re-reads changed schedules at least this often (seconds); also its longest sleep.
CELERY_BEAT_MAX_LOOP_INTERVAL = env.int("CELERY_BEAT_MAX_LOOP_INTERVAL", default=5, min_value=1, max_value=60)
# The dispatching beat renews its lease every SCHEDULES_LEASE_SECONDS / 4; a standby
# takes over at most SCHEDULES_LEASE_SECONDS (+ one renewal period) after it dies.
SCHEDULES_LEASE_SECONDS = env.int("SCHEDULES_LEASE_SECONDS", default=20, min_value=4, max_value=600)
# A run is "missed" when beat gets to it this many seconds after it was due; tasks
# whose policy is "skip" then wait for their next run. Must exceed a takeover.
SCHEDULES_MISSED_RUN_GRACE_SECONDS = env.int(
    "SCHEDULES_MISSED_RUN_GRACE_SECONDS", default=120, min_value=SCHEDULES_LEASE_SECONDS + 5
)
# How long the history of dispatched runs (the admin's "last run") is kept.
SCHEDULES_HISTORY_DAYS = env.int("SCHEDULES_HISTORY_DAYS", default=14, min_value=1)

# --- images (tasks/images.py) -------------------------------------------------

# Formats Pillow may parse at all (Image.open is limited to these plugins) and write.
IMAGES_ALLOWED_FORMATS = env.subset(
    "IMAGES_ALLOWED_FORMATS",
    default=["JPEG", "PNG", "WEBP", "GIF"],
    choices=["JPEG", "PNG", "WEBP", "GIF", "AVIF"],
)
# Pixels an image (or any intermediate result) may have: 40 MP covers camera photos and
# is far below Pillow's 89 MP warning (the ceiling here), so a decompression bomb is
# refused from its header.
IMAGES_MAX_PIXELS = env.int("IMAGES_MAX_PIXELS", default=40_000_000, min_value=1, max_value=89_478_485)
# Bytes of an uploaded file; checked before it is read.
IMAGES_MAX_FILE_BYTES = env.int("IMAGES_MAX_FILE_BYTES", default=30 * 1024 * 1024, min_value=1024)
# Quality of lossy outputs (JPEG, WebP, AVIF) unless a `convert` operation says otherwise.
IMAGES_DEFAULT_QUALITY = env.int("IMAGES_DEFAULT_QUALITY", default=85, min_value=1, max_value=100)

# --- data_sync (tasks/data_sync.py) -------------------------------------------

# The fetcher refuses loopback, private, link-local, multicast, reserved and
# cloud-metadata addresses (SSRF guard); hosts listed here ("host" or
# "host:port", as written in the source URL) are let through, e.g. an internal API.
DATA_SYNC_ALLOWED_HOSTS = env.list("DATA_SYNC_ALLOWED_HOSTS", default=[])
# Seconds to open a connection / to wait for each read: a dead upstream fails fast and is retried.
DATA_SYNC_CONNECT_TIMEOUT = env.float("DATA_SYNC_CONNECT_TIMEOUT", default=5.0, min_value=0.1)
DATA_SYNC_READ_TIMEOUT = env.float("DATA_SYNC_READ_TIMEOUT", default=30.0, min_value=0.1)
# Seconds for a whole page, redirects included: a server dripping bytes cannot hold a worker forever.
DATA_SYNC_PAGE_TIMEOUT = env.float("DATA_SYNC_PAGE_TIMEOUT", default=120.0, min_value=1)
# Bytes of one (decompressed) response body; the fetch stops at the cap, so memory stays bounded.
DATA_SYNC_MAX_RESPONSE_BYTES = env.int(
    "DATA_SYNC_MAX_RESPONSE_BYTES", default=20 * 1024 * 1024, min_value=1024
)
# Redirects followed per page, each hop checked again by the SSRF guard.
DATA_SYNC_MAX_REDIRECTS = env.int("DATA_SYNC_MAX_REDIRECTS", default=5, min_value=0, max_value=20)
# Pages per sync: a `next` link that never ends cannot keep a sync going (or its memory growing).
DATA_SYNC_MAX_PAGES = env.int("DATA_SYNC_MAX_PAGES", default=10_000, min_value=1)
# A page's own retry budget: a transient failure (network, timeout, 408/429/5xx) retries that page
# in place, up to this many tries in all, before the sync gives up and the task's retry resumes at
# that page (its checkpoint). Waits grow from DATA_SYNC_PAGE_RETRY_SECONDS (with jitter), or are
# what the server's Retry-After asks, never more than DATA_SYNC_PAGE_RETRY_MAX_SECONDS: a longer
# Retry-After is left to the task's retry, which does not hold a worker while it waits.
DATA_SYNC_PAGE_ATTEMPTS = env.int("DATA_SYNC_PAGE_ATTEMPTS", default=3, min_value=1, max_value=20)
DATA_SYNC_PAGE_RETRY_SECONDS = env.float("DATA_SYNC_PAGE_RETRY_SECONDS", default=1.0, min_value=0.001)
DATA_SYNC_PAGE_RETRY_MAX_SECONDS = env.float(
    "DATA_SYNC_PAGE_RETRY_MAX_SECONDS", default=30.0, min_value=0.001, max_value=600
)
# Where `data_sync.export` writes its JSON Lines files.
DATA_SYNC_EXPORT_DIR = Path(env.str("DATA_SYNC_EXPORT_DIR", default=str(MEDIA_ROOT / "exports")))
# An export covers changes up to `now - lag`: a batch that set changed_at just
# before the export but commits just after is picked up by the next export, not lost.
DATA_SYNC_EXPORT_LAG_SECONDS = env.int("DATA_SYNC_EXPORT_LAG_SECONDS", default=60, min_value=0)

# --- analytics (tasks/analytics.py) -------------------------------------------

# Events per INSERT statement when ingesting: large enough to amortise round trips,
# small enough to keep each statement's memory modest (SQLite caps it lower by itself).
ANALYTICS_INGEST_CHUNK_SIZE = env.int("ANALYTICS_INGEST_CHUNK_SIZE", default=2000, min_value=1)
# Days an ingested batch's key is kept so a redelivered or resent batch is recognised
# (redeliveries and retries come within hours; producers resend within minutes).
ANALYTICS_INGEST_KEY_RETENTION_DAYS = env.int("ANALYTICS_INGEST_KEY_RETENTION_DAYS", default=7, min_value=1)
# Days raw events are kept by `default.cleanup`; 0 keeps them forever. Daily metrics are
# kept either way, and days older than this can no longer be recomputed (their events are gone).
ANALYTICS_EVENT_RETENTION_DAYS = env.int("ANALYTICS_EVENT_RETENTION_DAYS", default=0, min_value=0)
# Event names listed in the daily report email (the busiest first).
ANALYTICS_REPORT_TOP_N = env.int("ANALYTICS_REPORT_TOP_N", default=10, min_value=1, max_value=100)

# --- maintenance (tasks/maintenance.py) ---------------------------------------

# Rows per DELETE statement: each batch is a short transaction, so a large clean-up
# neither holds long locks nor reads a table into memory.
MAINTENANCE_BATCH_SIZE = env.int("MAINTENANCE_BATCH_SIZE", default=1000, min_value=1, max_value=100_000)
# Retention per kind in days, by age; 0 keeps that kind forever. Task results and group
# results follow CELERY_RESULT_EXPIRES. Email logs: only rows in a final state (sent, failed, unknown).
MAINTENANCE_DEAD_LETTER_RETENTION_DAYS = env.int(
    "MAINTENANCE_DEAD_LETTER_RETENTION_DAYS", default=30, min_value=0
)
# Quarantined messages (broker messages no worker could run), by the time they were quarantined.
MAINTENANCE_QUARANTINE_RETENTION_DAYS = env.int(
    "MAINTENANCE_QUARANTINE_RETENTION_DAYS", default=30, min_value=0
)
MAINTENANCE_EMAIL_LOG_RETENTION_DAYS = env.int(
    "MAINTENANCE_EMAIL_LOG_RETENTION_DAYS", default=90, min_value=0
)
# Jobs' records (every job, API or not) once final: succeeded, failed or cancelled.
MAINTENANCE_JOB_RETENTION_DAYS = env.int("MAINTENANCE_JOB_RETENTION_DAYS", default=30, min_value=0)
MAINTENANCE_SYNC_RUN_RETENTION_DAYS = env.int("MAINTENANCE_SYNC_RUN_RETENTION_DAYS", default=90, min_value=0)
# Seconds one clean-up run may spend deleting before it stops between batches (the next
# run goes on from there): it must finish well inside the task's soft time limit.
MAINTENANCE_TIME_BUDGET_SECONDS = env.int(
    "MAINTENANCE_TIME_BUDGET_SECONDS",
    default=max(CELERY_TASK_SOFT_TIME_LIMIT - 60, CELERY_TASK_SOFT_TIME_LIMIT // 2, 1),
    min_value=1,
    max_value=CELERY_TASK_SOFT_TIME_LIMIT,
)

# --- monitoring (monitoring/) ------------------------------------------------

# Celery signal handlers count every task by name, queue and outcome, with run-time and
# queue-wait histograms; each process buffers them and flushes to Redis at most every
# METRICS_FLUSH_SECONDS (one pipelined round trip), never a database write per task.
METRICS_ENABLED = env.bool("METRICS_ENABLED", default=True)
# Where the counters live: the broker's Redis by default; with RabbitMQ, name a Redis here
# (empty turns collection off, with a warning at start-up).
METRICS_REDIS_URL = env.str("METRICS_REDIS_URL", default=CELERY_BROKER_URL if BROKER_IS_REDIS else "")
METRICS_FLUSH_SECONDS = env.float("METRICS_FLUSH_SECONDS", default=1.0, min_value=0.05, max_value=60)
# `monitoring.rollup` (every minute) writes per-minute rows; rows older than
# METRICS_MINUTE_ROWS_HOURS are compacted to hourly ones, and all are kept METRICS_RETENTION_DAYS.
METRICS_RETENTION_DAYS = env.int("METRICS_RETENTION_DAYS", default=14, min_value=1)
METRICS_MINUTE_ROWS_HOURS = env.int("METRICS_MINUTE_ROWS_HOURS", default=24, min_value=1)
# A Prometheus scraper sends `Authorization: Bearer <METRICS_TOKEN>` to /metrics; empty:
# only logged-in staff may read it.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
# Seconds `manage.py workers --ask` waits for workers' answers to its broadcast. No request
# path asks the workers: they report themselves (below).
METRICS_INSPECT_TIMEOUT = env.float("METRICS_INSPECT_TIMEOUT", default=1.0, min_value=0.1, max_value=30)
# Every worker writes its presence (queues it consumes, messages it holds) this often
# (monitoring.heartbeat); one not seen for three beats counts as gone.
MONITORING_WORKER_HEARTBEAT_SECONDS = env.float(
    "MONITORING_WORKER_HEARTBEAT_SECONDS", default=5.0, min_value=0.2, max_value=300
)
# Task events that Flower turned on (its enable_events broadcast, every 5 s) go off again once none has
# come for this long: nobody is watching (monitoring/watchers.py).
MONITORING_TASK_EVENTS_LAPSE_SECONDS = env.float(
    "MONITORING_TASK_EVENTS_LAPSE_SECONDS", default=60.0, min_value=1, max_value=3600
)
# Each web process refreshes /readyz's checks this often, in the background, while it is asked;
# a request answers the last results at once.
READYZ_REFRESH_SECONDS = env.float("READYZ_REFRESH_SECONDS", default=2.0, min_value=0.1, max_value=60)
# The admin metrics page reloads itself this often (seconds).
METRICS_PAGE_REFRESH_SECONDS = env.int("METRICS_PAGE_REFRESH_SECONDS", default=30, min_value=5)

# Alert rules (monitoring/alerts.py), evaluated every minute by `default.check_alerts`. These
# are the values the rules are created with; after that they are edited in the admin.
ALERT_FAILURE_RATE_PERCENT = env.float("ALERT_FAILURE_RATE_PERCENT", default=1.0, min_value=0, max_value=100)
ALERT_QUEUE_WAIT_P95_MS = env.float("ALERT_QUEUE_WAIT_P95_MS", default=100.0, min_value=0)
ALERT_BACKLOG_MESSAGES = env.int("ALERT_BACKLOG_MESSAGES", default=1000, min_value=0)
ALERT_DEAD_LETTERS = env.int("ALERT_DEAD_LETTERS", default=0, min_value=0)
ALERT_WINDOW_MINUTES = env.int("ALERT_WINDOW_MINUTES", default=15, min_value=1, max_value=24 * 60)
ALERT_MIN_RUNS = env.int("ALERT_MIN_RUNS", default=20, min_value=1)
ALERT_REPEAT_MINUTES = env.int("ALERT_REPEAT_MINUTES", default=60, min_value=1)

# --- REST API (jobs/) -----------------------------------------------------------

# Job types the API may enqueue (task names); each is checked against its task's schema.
JOBS_API_TYPES = env.list(
    "JOBS_API_TYPES",
    default=[
        "default.ping",
        "email.send",
        "email.newsletter",
        "images.process",
        "data_sync.sync",
        "data_sync.export",
        "analytics.ingest",
        "analytics.aggregate_daily",
        "analytics.backfill",
        "analytics.daily_report",
    ],
)
# Jobs each token may enqueue per period (a batch counts each job), shared by every web
# process through RATE_LIMIT_STORAGE_URL.
JOBS_API_ENQUEUE_RATE = env.rate("JOBS_API_ENQUEUE_RATE", default="6000/minute")
# Bytes of one job's body (POST /api/jobs, and each entry of a batch); of one job of a type whose
# documented arguments are large (analytics.ingest: 10,000 events; email.newsletter: 100,000
# addresses); and of a whole batch. A web process reads at most one body at a time per worker.
JOBS_API_MAX_BODY_BYTES = env.int("JOBS_API_MAX_BODY_BYTES", default=64 * 1024, min_value=1024)
JOBS_API_MAX_BULK_BODY_BYTES = env.int(
    "JOBS_API_MAX_BULK_BODY_BYTES",
    default=max(8 * 1024 * 1024, JOBS_API_MAX_BODY_BYTES),
    min_value=JOBS_API_MAX_BODY_BYTES,
)
JOBS_API_MAX_BATCH_BYTES = env.int(
    "JOBS_API_MAX_BATCH_BYTES",
    default=max(16 * 1024 * 1024, JOBS_API_MAX_BULK_BODY_BYTES),
    min_value=JOBS_API_MAX_BULK_BODY_BYTES,
)
# Django's own cap on a body read into memory: never lower than the API's, which answer 413 themselves.
DATA_UPLOAD_MAX_MEMORY_SIZE = JOBS_API_MAX_BATCH_BYTES
# Seconds the web process waits for the broker to take a job before answering 503.
JOBS_API_PUBLISH_TIMEOUT_SECONDS = env.float(
    "JOBS_API_PUBLISH_TIMEOUT_SECONDS", default=2.0, min_value=0.1, max_value=30
)
# Longer delays are held in the database and released by `default.release_jobs` when due:
# an ETA message held by a worker past the visibility timeout would be delivered twice.
JOBS_BROKER_MAX_DELAY_SECONDS = env.int(
    "JOBS_BROKER_MAX_DELAY_SECONDS",
    default=min(300, CELERY_BROKER_VISIBILITY_TIMEOUT // 2),
    min_value=0,
    max_value=CELERY_BROKER_VISIBILITY_TIMEOUT // 2,
)
# A job row still unpublished this long after it was written (its request died between commit
# and publish) is published by `default.release_jobs`.
# jobs.reconcile: a job published this long ago whose message no broker holds is sent again;
# the broker is read only while it holds at most JOBS_RECONCILE_MAX_MESSAGES messages.
JOBS_RECONCILE_AFTER_SECONDS = env.int("JOBS_RECONCILE_AFTER_SECONDS", default=60, min_value=5)
JOBS_RECONCILE_MAX_MESSAGES = env.int("JOBS_RECONCILE_MAX_MESSAGES", default=200_000, min_value=0)
JOBS_PUBLISH_GRACE_SECONDS = env.int("JOBS_PUBLISH_GRACE_SECONDS", default=30, min_value=5)

# --- Flower -------------------------------------------------------------------

FLOWER_URL = env.str("FLOWER_URL", default="http://127.0.0.1:5555")

# --- Logging ------------------------------------------------------------------

LOG_LEVEL = env.choice("LOG_LEVEL", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"},
    },
    "filters": {"drop_not_ready": {"()": "monitoring.logfilters.DropNotReadyResponses"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "celery": {"level": LOG_LEVEL},
        "django.db.backends": {"level": "WARNING"},
        # A load balancer polling /readyz while a worker is down is not an error per poll.
        "django.request": {"filters": ["drop_not_ready"]},
    },
}

# --- Sentry -------------------------------------------------------------------

SENTRY_DSN = env.str("SENTRY_DSN", default="")
SENTRY_ENVIRONMENT = env.str("SENTRY_ENVIRONMENT", default="development" if DEBUG else "production")
SENTRY_TRACES_SAMPLE_RATE = (
    float(env.int("SENTRY_TRACES_SAMPLE_PERCENT", default=0, min_value=0, max_value=100)) / 100
)

if SENTRY_DSN:
    from config.sentry import init_sentry

    init_sentry(SENTRY_DSN, environment=SENTRY_ENVIRONMENT, traces_sample_rate=SENTRY_TRACES_SAMPLE_RATE)
