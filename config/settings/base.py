"""Settings shared by every environment, read from the environment.

Every variable read here is listed, with its default, in the README. Defaults
are safe and local; the only thing with no default outside DEBUG is the secret
key.
"""

from __future__ import annotations

from pathlib import Path

from kombu import Queue

from config.env import Env

BASE_DIR = Path(__file__).resolve().parent.parent.parent
env = Env()

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
    "tasks",
    "scheduling",
    "monitoring",
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
        "DIRS": [],
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

# --- Security -----------------------------------------------------------------

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Behind HTTPS in production these must be on; DEBUG (local, plain HTTP) turns them off.
SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=not DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SESSION_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=0, min_value=0)
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

# --- Celery -------------------------------------------------------------------
# Read by config/celery_app.py through the CELERY_ namespace. Each choice says why.

# The run command starts an embedded Valkey on this address when no broker is set.
EMBEDDED_BROKER_URL = "redis://127.0.0.1:6390/0"
CELERY_BROKER_URL = env.broker_url("CELERY_BROKER_URL", default=EMBEDDED_BROKER_URL)
# Results live in the database (django-celery-results): they survive a broker
# restart or flush, and the API can list them with the ORM.
CELERY_RESULT_BACKEND = "django-db"
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
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": CELERY_BROKER_VISIBILITY_TIMEOUT,
    # Detect half-open connections (NAT, load balancers) instead of hanging.
    "health_check_interval": 25,
    "socket_keepalive": True,
}

# Events on: Flower and the monitoring app build on them.
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_TASK_SEND_SENT_EVENT = True
# Report STARTED so the API can tell "queued" from "running".
CELERY_TASK_TRACK_STARTED = True

# Our tasks are seconds to minutes long (SMTP, images, HTTP pages): a worker
# reserves one message per process so a slow task never holds others hostage.
CELERY_WORKER_PREFETCH_MULTIPLIER = env.int("CELERY_WORKER_PREFETCH_MULTIPLIER", default=1, min_value=1)
CELERY_WORKER_CONCURRENCY = env.int("CELERY_WORKER_CONCURRENCY", default=2, min_value=1)
# Recycle pool processes to bound memory growth from Pillow and large payloads.
CELERY_WORKER_MAX_TASKS_PER_CHILD = env.int("CELERY_WORKER_MAX_TASKS_PER_CHILD", default=1000, min_value=1)
CELERY_WORKER_MAX_MEMORY_PER_CHILD = env.int(
    "CELERY_WORKER_MAX_MEMORY_PER_CHILD", default=512_000, min_value=10_000
)  # KiB
# Logging goes through Django's LOGGING (see config/celery_app.py).
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# --- Queues and routing: the one place that says what runs where. ------------

TASK_QUEUES = ("email", "images", "data_sync", "analytics", "default")
CELERY_TASK_QUEUES = tuple(Queue(name, routing_key=name) for name in TASK_QUEUES)
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_DEFAULT_EXCHANGE = "default"
CELERY_TASK_DEFAULT_ROUTING_KEY = "default"
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
)

CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = TIME_ZONE

# --- Flower -------------------------------------------------------------------

FLOWER_URL = env.str("FLOWER_URL", default="http://127.0.0.1:5555")

# --- Logging ------------------------------------------------------------------

LOG_LEVEL = env.choice(
    "LOG_LEVEL", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
)
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "celery": {"level": LOG_LEVEL},
        "django.db.backends": {"level": "WARNING"},
    },
}

# --- Sentry -------------------------------------------------------------------

SENTRY_DSN = env.str("SENTRY_DSN", default="")
SENTRY_ENVIRONMENT = env.str("SENTRY_ENVIRONMENT", default="development" if DEBUG else "production")
SENTRY_TRACES_SAMPLE_RATE = float(env.int("SENTRY_TRACES_SAMPLE_PERCENT", default=0, min_value=0, max_value=100)) / 100

if SENTRY_DSN:
    from config.sentry import init_sentry

    init_sentry(SENTRY_DSN, environment=SENTRY_ENVIRONMENT, traces_sample_rate=SENTRY_TRACES_SAMPLE_RATE)
