"""A consumer bootstep: a message no worker can run is quarantined and acked; the worker goes on.

Celery's consumer calls `on_unknown_message`, `on_unknown_task`, `on_invalid_task` and
`on_decode_error` for messages it cannot run; by default they log the body (which may hold
personal data) and drop the message. This step gives the consumer its own versions of those
four (set on the consumer instance; Celery's code is not patched) that keep the message in the
quarantine (tasks/quarantine.py), log its queue, reason and size only, send Celery's usual
signals (so monitoring counts them as before), and ack it.

It also checks the envelope of a message for a known task before Celery reads it: an `id`
header that is missing or not a string, or a body that is not protocol 2's `[args, kwargs,
embed]`, would otherwise fail later in the pool or raise out of the consumer. Anything else the
consumer's handler raises for one message quarantines that message instead of stopping the
worker; connection errors still go to Celery, which reconnects.

Registered in TasksConfig.ready (every process; only workers build a consumer).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps, signals
from celery.exceptions import NotRegistered
from celery.utils.collections import AttributeDict
from kombu.exceptions import ContentDisallowed

from config import brokers
from tasks import quarantine

logger = logging.getLogger(__name__)

Kind = quarantine.Kind


def _queue_of(message: Any) -> str:
    info = getattr(message, "delivery_info", None) or {}
    return brokers.queue_of(info.get("routing_key") or info.get("exchange"))


def _raw_text(payload: Any) -> str:
    try:
        return json.dumps(payload, default=repr, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(payload)


def _headers_of(message: Any) -> dict[str, Any]:
    headers = getattr(message, "headers", None)
    return headers if isinstance(headers, dict) else {}


def envelope_problem(message: Any, registered: Any) -> tuple[str, str] | None:
    """(kind, reason) when a protocol-2 message for a known task cannot be run; None otherwise
    (the consumer's own checks, and our handlers below, take the rest)."""
    headers = getattr(message, "headers", None)
    if not isinstance(headers, dict) or "task" not in headers:
        return None
    name = headers["task"]
    if not isinstance(name, str) or not name:
        return Kind.ENVELOPE, "the 'task' header is not a task name"
    if name not in registered:
        return None  # on_unknown_task
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        return Kind.ENVELOPE, f"task {name!r}: the 'id' header is missing or not a string"
    try:
        payload = message.payload
    except ContentDisallowed as exc:
        return Kind.CONTENT_TYPE, f"task {name!r}: {exc} (workers accept JSON only)"
    except Exception as exc:
        return Kind.UNDECODABLE, f"task {name!r}: the body cannot be decoded ({type(exc).__name__}: {exc})"
    if isinstance(payload, dict) and "args" in payload:
        return None  # a protocol-1 body with protocol-2 headers: Celery reads it
    if not (
        isinstance(payload, list | tuple)
        and len(payload) == 3
        and isinstance(payload[0], list | tuple)
        and isinstance(payload[1], dict)
        and isinstance(payload[2], dict | None)
    ):
        return (
            Kind.ENVELOPE,
            f"task {name!r}: the body is not Celery's protocol 2 [args, kwargs, embed] "
            f"(a {type(payload).__name__})",
        )
    return None


class PoisonMessages(bootsteps.Step):
    """Consumer step: see the module's docstring."""

    name = "tasks.poison.PoisonMessages"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.consumer = c
        # Before the Tasks step starts: it hands on_decode_error to the task consumer then.
        c.on_unknown_message = self.on_unknown_message
        c.on_unknown_task = self.on_unknown_task
        c.on_invalid_task = self.on_invalid_task
        c.on_decode_error = self.on_decode_error
        create_task_handler = c.create_task_handler

        def guarded_task_handler(*args: Any, **kwargs: Any) -> Callable[[Any], Any]:
            return self.guard(create_task_handler(*args, **kwargs))

        c.create_task_handler = guarded_task_handler

    # --- keeping and acking one message ------------------------------------------------

    def quarantine(self, message: Any, kind: str, reason: str) -> None:
        try:
            # kombu hands on_decode_error the raw payload (a dict) when it could not even make a
            # Message of it: keep that whole.
            body = getattr(message, "body", None) if hasattr(message, "ack") else _raw_text(message)
            row = quarantine.build(
                queue=_queue_of(message),
                kind=kind,
                reason=reason,
                body=body,
                headers=getattr(message, "headers", None),
                content_type=getattr(message, "content_type", None),
                content_encoding=getattr(message, "content_encoding", None),
            )
            quarantine.record_message(row)
        except Exception:
            logger.exception(
                "quarantine: could not keep a message from queue %r (%s)", _queue_of(message), kind
            )
        finally:
            self.ack(message)

    def ack(self, message: Any) -> None:
        if hasattr(message, "ack_log_error") and not getattr(message, "acknowledged", False):
            message.ack_log_error(logger, self.consumer.connection_errors)

    def guard(self, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        c = self.consumer
        passthrough = tuple(c.connection_errors) + tuple(c.channel_errors)

        def on_task_received(message: Any) -> Any:
            try:
                problem = envelope_problem(message, c.app.tasks)
            except Exception as exc:
                problem = (Kind.ENVELOPE, f"the headers cannot be read ({type(exc).__name__})")
            if problem is not None:
                self.quarantine(message, *problem)
                signals.task_rejected.send(sender=c, message=message, exc=None)
                return None
            try:
                return handler(message)
            except passthrough:
                raise
            except Exception as exc:
                # The type only: an exception's text may quote the message.
                self.quarantine(
                    message, Kind.ENVELOPE, f"the worker could not read it ({type(exc).__name__})"
                )
                signals.task_rejected.send(sender=c, message=message, exc=exc)
                return None

        return on_task_received

    # --- Celery's four hooks -----------------------------------------------------------

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.quarantine(message, Kind.ENVELOPE, "not a Celery task message (no 'task' header or field)")
        signals.task_rejected.send(sender=self.consumer, message=message, exc=None)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        headers = _headers_of(message)
        name, task_id = headers.get("task"), headers.get("id")
        self.quarantine(message, Kind.UNKNOWN_TASK, f"no worker knows the task {name!r}")
        # As Celery does: a caller waiting on the result learns it failed, and listeners hear of it.
        c = self.consumer
        try:
            if isinstance(task_id, str) and isinstance(name, str):
                request = {
                    "name": name,
                    "chord": None,
                    "root_id": headers.get("root_id"),
                    "correlation_id": (getattr(message, "properties", None) or {}).get("correlation_id"),
                    "reply_to": (getattr(message, "properties", None) or {}).get("reply_to"),
                    "errbacks": None,
                }
                c.app.backend.mark_as_failure(task_id, NotRegistered(name), request=AttributeDict(request))
                if c.event_dispatcher:
                    c.event_dispatcher.send("task-failed", uuid=task_id, exception=f"NotRegistered({name!r})")
        except Exception as error:
            logger.warning("quarantine: could not mark task %s as failed (%s)", task_id, type(error).__name__)
        signals.task_unknown.send(sender=c, message=message, exc=exc, name=name, id=task_id)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        kind = Kind.CONTENT_TYPE if isinstance(exc, ContentDisallowed) else Kind.ENVELOPE
        self.quarantine(message, kind, f"{type(exc).__name__}: {exc}")
        signals.task_rejected.send(sender=self.consumer, message=message, exc=exc)

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        kind = Kind.CONTENT_TYPE if isinstance(exc, ContentDisallowed) else Kind.UNDECODABLE
        self.quarantine(message, kind, f"the body cannot be decoded ({type(exc).__name__}: {exc})")
        signals.task_rejected.send(sender=self.consumer, message=message, exc=exc)


def install(app: Any) -> None:
    """Adds the step to the app's consumer blueprint (once)."""
    app.steps["consumer"].add(PoisonMessages)
