"""Sentry: errors from web, workers and beat, when SENTRY_DSN is set.

- An event raised while a task runs carries the tags `celery_task` (name),
  `celery_queue` (the routing key it was delivered with) and `celery_attempt`
  (1 for the first run). sentry-sdk's CeleryIntegration adds only `celery_task_id`
  (and the name under `extra["celery-job"]`), so these do not repeat it.
- No email address leaves the process: any string in an event (message,
  exception value, frame variable, breadcrumb, extra, request, tag) has its
  addresses replaced by "[email]". Values under secret-ish keys (password,
  token, api_key, authorization, secret, dsn... as part of a name, e.g.
  `smtp_password`) and passwords in URLs become "[Filtered]", on top of
  sentry-sdk's own EventScrubber.
- Beat: scheduling.beat sends its tasks itself, past the `Scheduler.apply_entry`
  that sentry-sdk patches for Crons, so it asks `beat_check_in_headers` for the
  "in progress" check-in and the headers with which the worker reports the end
  of the run (sentry-sdk's task_success/failure/retry handlers).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, cast

from django.core.exceptions import ImproperlyConfigured

from config import brokers

if TYPE_CHECKING:
    from sentry_sdk._types import Event  # a TypedDict, for type checking only

logger = logging.getLogger(__name__)

EMAIL_SUBSTITUTE = "[email]"
FILTERED = "[Filtered]"  # sentry-sdk's own substitute, so both scrubbers read the same in Sentry

EMAIL_ADDRESS = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
# scheme://user:password@host -> scheme://user:[Filtered]@host (broker, database, SMTP URLs in messages)
URL_PASSWORD = re.compile(r"(?P<start>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@]*:)[^\s/@]+@")
# A key holding one of these, in any case and as part of a longer name, holds a secret.
SECRET_NAME_PARTS = (
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "credential",
    "private_key",
    "dsn",
)
# Exact names for sentry-sdk's EventScrubber (which matches whole keys only).
EXTRA_DENYLIST = ["dsn", "sentry_dsn", "secret_key", "django_secret_key", "email_host_password"]


def init_sentry(dsn: str, *, environment: str, traces_sample_rate: float) -> None:
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.django import DjangoIntegration
    from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber
    from sentry_sdk.utils import BadDsn

    try:
        sentry_sdk.init(
            dsn=dsn,
            environment=environment,
            integrations=[DjangoIntegration(), CeleryIntegration(monitor_beat_tasks=True)],
            traces_sample_rate=traces_sample_rate,
            # Never attach user emails, IPs, cookies or request bodies.
            send_default_pii=False,
            max_request_body_size="never",
            event_scrubber=EventScrubber(denylist=[*DEFAULT_DENYLIST, *EXTRA_DENYLIST], recursive=True),
            before_send=before_send,
            before_send_transaction=before_send_transaction,
            # No before_breadcrumb: breadcrumbs travel inside events, which before_send scrubs
            # whole; scrubbing each one as it is recorded would cost every log line, sent or not.
        )
    except BadDsn as exc:
        raise ImproperlyConfigured(f"SENTRY_DSN is not a valid Sentry DSN: {exc}") from None


# --- events -----------------------------------------------------------------------


def before_send(event: Event, hint: dict[str, Any]) -> Event:
    """Tags the event with the running task, then takes addresses and secrets out of it."""
    if event.get("type") != "check_in":
        tags = event.get("tags")
        if not isinstance(tags, dict):
            tags = event["tags"] = {}
        for name, value in task_tags().items():
            tags.setdefault(name, value)
    return scrub_event(event)


def before_send_transaction(event: Event, hint: dict[str, Any]) -> Event:
    """Spans carry URLs and descriptions: the same scrubbing as errors (tracing is off by default)."""
    return scrub_event(event)


def task_tags() -> dict[str, str]:
    """Tags for the task running in this thread; none outside a task.

    Read when an event is sent, from Celery's own per-thread stack of running tasks
    (the same one `self.request` reads; sentry-sdk captures a task's exception while
    that task is still on it), rather than set on a Sentry scope in a task_prerun
    handler. It costs nothing for the tasks that raise nothing, and it cannot leak:
    a prefork child runs task after task in one long-lived process, so a tag set on
    any scope but the per-task isolation scope sentry-sdk opens (the global one, or
    the current one outside a task) would stay on the next tasks' events.
    """
    from celery import current_task

    if not current_task:  # a proxy: false when no task runs in this thread
        return {}
    request = current_task.request
    if request.called_directly:  # a task called as a function, e.g. in a view: not a Celery run
        return {}
    delivery = request.delivery_info or {}
    return {
        "celery_task": str(current_task.name),
        "celery_queue": brokers.queue_of(delivery.get("routing_key") or delivery.get("queue") or "unknown"),
        # As tasks.base.JobTask counts them: the first run is attempt 1.
        "celery_attempt": str((request.retries or 0) + 1),
    }


def scrub_event(event: Event) -> Event:
    """The event without email addresses, URL passwords or values under secret-ish keys.

    before_send sees the event already serialised (plain dicts, lists, strings,
    frame variables as their repr), so a walk over it reaches every string.
    """
    return cast("Event", scrub(event))


def scrub(value: Any) -> Any:
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {
            scrub_text(key) if isinstance(key, str) else key: (
                FILTERED if is_secret_name(key) and item not in (None, "") else scrub(item)
            )
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [scrub(item) for item in value]
    return value


def scrub_text(text: str) -> str:
    if "@" not in text:  # almost every string: no regex
        return text
    text = URL_PASSWORD.sub(rf"\g<start>{FILTERED}@", text)
    return EMAIL_ADDRESS.sub(EMAIL_SUBSTITUTE, text)


def is_secret_name(key: object) -> bool:
    if not isinstance(key, str):
        return False
    lowered = key.lower()
    return any(part in lowered for part in SECRET_NAME_PARTS)


# --- beat: Sentry Crons check-ins ---------------------------------------------------


def monitor_config(schedule: Any) -> dict[str, Any] | None:
    """Sentry's monitor config for one of scheduling.beat's schedules; None if Crons cannot express it.

    Duck-typed on scheduling.beat's CronSchedule (`.cron`) and SlotSchedule
    (`.every`, seconds), so that config does not import scheduling. Sentry's
    intervals are whole minutes or longer; solar and clocked schedules have no
    equivalent (sentry-sdk skips those too).
    """
    cron = getattr(schedule, "cron", None)
    if cron is not None:
        return {"schedule": {"type": "crontab", "value": cron.expression}, "timezone": cron.zone.key}
    every = getattr(schedule, "every", None)
    if not isinstance(every, int | float) or every < 60 or every % 60:
        return None
    minutes = int(every // 60)
    unit, size = "minute", 1
    for larger, minutes_in_it in (("week", 7 * 24 * 60), ("day", 24 * 60), ("hour", 60)):
        if minutes % minutes_in_it == 0:
            unit, size = larger, minutes_in_it
            break
    return {"schedule": {"type": "interval", "value": minutes // size, "unit": unit}, "timezone": "UTC"}


def beat_check_in_headers(name: str, schedule: Any) -> dict[str, Any]:
    """Sends the "in progress" check-in of schedule `name` and returns the headers for its message.

    The worker that runs the task reads them (sentry-sdk's CeleryIntegration,
    monitor_beat_tasks=True) and sends the "ok" or "error" check-in. The headers
    are sentry-sdk's own (`_apply_crons_data_to_schedule_entry` in
    sentry_sdk/integrations/celery/beat.py). Empty when Sentry is off, the
    schedule is excluded or cannot be monitored. Never raises: a monitoring
    problem must not stop a scheduled run.
    """
    try:
        import sentry_sdk
        from sentry_sdk.crons import MonitorStatus, capture_checkin
        from sentry_sdk.integrations.celery import CeleryIntegration
        from sentry_sdk.utils import match_regex_list

        integration = sentry_sdk.get_client().get_integration(CeleryIntegration)
        if integration is None or not integration.monitor_beat_tasks:
            return {}
        if match_regex_list(name, integration.exclude_beat_tasks):
            return {}
        config = monitor_config(schedule)
        if config is None:
            return {}
        # Each scheduled run starts a trace of its own, as with sentry-sdk's patched beat.
        sentry_sdk.get_isolation_scope().set_new_propagation_context()
        check_in_id = capture_checkin(
            monitor_slug=name,
            monitor_config=config,  # type: ignore[arg-type]  # a TypedDict in sentry-sdk
            status=MonitorStatus.IN_PROGRESS,
        )
        if check_in_id is None:
            return {}
        return {
            "sentry-monitor-slug": name,
            "sentry-monitor-config": config,
            "sentry-monitor-check-in-id": check_in_id,
        }
    except Exception:
        logger.exception("sentry: could not check in schedule %r; sending it without", name)
        return {}
