"""One policy for every task: validation, retries, progress, dead letters.

A task opts in with `@app.task(base=JobTask, name="family.verb", schema=..., idempotency="...")`:

- arguments are validated against `schema` (a pydantic model whose fields are
  the task's parameters) when the task is sent and again when it starts;
- `TransientJobError` (and whatever the task adds to `autoretry_for`) is retried
  under the task family's retry policy (tasks.retries: attempts, and a wait that
  grows to a cap, with equal jitter), waiting at least what the other side asked
  for (`retry_after`); a wait longer than JOBS_BROKER_MAX_DELAY_SECONDS is held in
  the job's row, not in the broker, and `default.release_jobs` sends it when due;
- `PermanentJobError` (bad arguments, a missing row, a 4xx answer, an
  undecodable file) fails at once;
- a task that fails for good leaves a dead letter (tasks.deadletters) holding
  its arguments and traceback, which can be replayed;
- arguments named in `masked` are shown masked in Flower, events, logs and
  the result backend; the dead letter keeps them as given, for replay.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Annotated, Any, ClassVar

from celery import Task
from celery._state import _task_stack  # type: ignore[attr-defined]  # what Task.__call__ uses
from celery.exceptions import Retry
from celery.utils import uuid as uuid_text
from django.apps import apps as django_apps
from django.conf import settings
from django.utils import timezone
from pydantic import BaseModel, Field, ValidationError

from config import brokers
from jobs.protocol import (
    BROKER_ERRORS,
    DEFERRED_HEADER,
    DELIVERY_COUNT_HEADER,
    FIRST_FAILURE_HEADER,
    JOB_HEADER,
    PARENT_HEADER,
    REPLAY_HEADER,
    RESENT_HEADER,
)
from tasks import reliability, retries
from tasks.errors import DeliveryLimitExceeded, InvalidArguments, PermanentJobError, TransientJobError
from tasks.retries import RetryPolicy

# Re-exported: task modules and the faces import them from here.
__all__ = [
    "BROKER_ERRORS",
    "FIRST_FAILURE_HEADER",
    "JOB_HEADER",
    "MAX_INTEGER",
    "REPLAY_HEADER",
    "RESENT_HEADER",
    "DeliveryLimitExceeded",
    "InvalidArguments",
    "JobTask",
    "PermanentJobError",
    "RetryPolicy",
    "RowId",
    "TransientJobError",
]

logger = logging.getLogger(__name__)

# The largest integer a database column holds (PostgreSQL bigint; SQLite's integer too). Every integer
# argument of a task is bounded by it or less in its schema, so 10**30 is refused when the job is
# sent, not by the database in the worker (tests/tasks/test_policy.py checks every schema).
MAX_INTEGER = 2**63 - 1
# An argument that names a row by its primary key.
RowId = Annotated[int, Field(gt=0, le=MAX_INTEGER)]


def mask_email(address: str) -> str:
    """`alice@example.com` -> `a***@e***.com`: enough to tell messages apart, not to read them."""
    local, _, domain = str(address).rpartition("@")
    if not local:
        return "***"
    host, dot, tld = domain.rpartition(".")
    return f"{local[0]}***@{(host or tld)[:1]}***{dot}{tld if host else ''}"


def mask_value(value: Any) -> Any:
    if isinstance(value, str):
        return mask_email(value) if "@" in value else "***"
    if isinstance(value, list | tuple):
        return [mask_value(item) for item in value]
    if isinstance(value, dict):
        return {key: mask_value(item) for key, item in value.items()}
    return "***"


def describe_validation_error(task_name: str, error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(arguments)"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"field '{field}': {message}")
    return f"{task_name}: invalid arguments: " + "; ".join(problems)


def asked_wait(exc: BaseException | None) -> float | None:
    """The seconds the other side asked us to wait (`retry_after`) on `exc` or the error it wraps
    (`raise TransientJobError(...) from TransientFetchError(..., retry_after=120)`)."""
    for error in (exc, getattr(exc, "__cause__", None)):
        asked = getattr(error, "retry_after", None)
        if asked is not None:
            return float(asked)
    return None


class JobTask(Task):
    """The base class of every task in this project (see the module docstring)."""

    abstract = True

    schema: ClassVar[type[BaseModel] | None] = None
    # How a second run with the same arguments does no harm; every task says it.
    idempotency: ClassVar[str] = ""
    masked: ClassVar[frozenset[str]] = frozenset()
    # Arguments that name a row, and its model: {"asset_id": "tasks.ImageAsset"}. Checked where a job
    # comes from outside (the API, jobs.outbox.enqueue, the schedule admin): one indexed lookup each.
    references: ClassVar[Mapping[str, str]] = {}
    # The setting bounding a job's body (bytes) in the REST API. Tasks whose documented arguments
    # are large (10,000 events, 100,000 addresses) name JOBS_API_MAX_BULK_BODY_BYTES.
    body_limit_setting: ClassVar[str] = "JOBS_API_MAX_BODY_BYTES"

    autoretry_for: ClassVar[tuple[type[BaseException], ...]] = (TransientJobError,)
    dont_autoretry_for: ClassVar[tuple[type[BaseException], ...]] = (PermanentJobError,)
    # How the task retries (tasks.retries). None: its family's policy, by task-name prefix
    # (`email.send`: email's), with JOBS_RETRY_<FAMILY> applied; `max_attempts` alone changes the
    # attempts and keeps the family's waits. `policy` is the one in force.
    retry_policy: ClassVar[RetryPolicy | None] = None
    max_attempts: ClassVar[int | None] = None
    policy: ClassVar[RetryPolicy] = retries.DEFAULT
    # Countdowns are ours (RetryPolicy.wait): Celery's own backoff is whole seconds and full jitter.
    retry_backoff = False
    # `running` is written by the job's claim (before_start), in its row: no STARTED result as well
    # (tasks.backends records a job once per state change).
    track_started = False
    # The worker's request: a run terminated by a cancel writes `cancelled` to its row once its pool
    # process is gone (tasks.requests). A string: imported by workers only.
    Request = "tasks.requests:JobRequest"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        policy = cls.retry_policy or retries.configured(retries.family_of(getattr(cls, "name", None)))
        if cls.max_attempts is not None:
            if cls.max_attempts < 1:
                raise ValueError(f"{cls.__name__}.max_attempts must be at least 1")
            policy = dataclasses.replace(policy, attempts=cls.max_attempts)
        cls.policy = policy
        cls.max_retries = policy.retries

    # --- arguments ----------------------------------------------------------

    @functools.cached_property
    def run_signature(self) -> inspect.Signature:
        """The signature of the task's function, worked out once (16 µs a call, every send and run)."""
        return inspect.signature(self._orig_run if hasattr(self, "_orig_run") else self.run)

    def bind_arguments(self, args: tuple[Any, ...] | list[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        try:
            bound = self.run_signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidArguments(f"{self.name}: {exc}") from None
        return dict(bound.arguments)

    def validate_arguments(
        self, args: tuple[Any, ...] | list[Any] | None, kwargs: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """The arguments as keyword arguments, checked (and normalised) by the schema."""
        arguments = self.bind_arguments(args or (), kwargs or {})
        if self.schema is None:
            return arguments
        try:
            validated = self.schema.model_validate(arguments)
        except ValidationError as exc:
            raise InvalidArguments(describe_validation_error(self.name, exc)) from None
        return {name: getattr(validated, name) for name in type(validated).model_fields}

    def missing_references(self, arguments: Mapping[str, Any]) -> dict[str, str]:
        """Argument name -> why the row it names does not do, for each of `references` that is not there."""
        missing = {}
        for name, label in self.references.items():
            value = arguments.get(name)
            if value is None:
                continue
            model = django_apps.get_model(label)
            if not model._default_manager.filter(pk=value).exists():
                missing[name] = f"{model._meta.verbose_name} {value} does not exist"
        return missing

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:  # type: ignore[override]
        """Sends the task after checking its arguments; masked ones are shown masked.

        `arguments_checked=True`: they were checked when the job was recorded (jobs.publish sends
        recorded jobs); the worker checks them again before running either way."""
        if not options.pop("arguments_checked", False):
            self.validate_arguments(args, kwargs)
        if self.masked:
            arguments = self.bind_arguments(args or (), kwargs or {}) if args or kwargs else {}
            shown = {k: mask_value(v) if k in self.masked else v for k, v in arguments.items()}
            options.setdefault("argsrepr", "()")
            options.setdefault("kwargsrepr", repr(shown))
        return super().apply_async(args, kwargs, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Checked again where it runs: the message may come from an older sender, or by hand.
        validated = self.validate_arguments(args, kwargs)
        # As Task.__call__, except that `run` gets the validated values while the
        # request keeps the arguments as they came: a retry re-sends those (JSON),
        # never the parsed objects.
        _task_stack.push(self)
        self.push_request(args=args, kwargs=kwargs)
        try:
            return self.run(**validated)
        except reliability.DATABASE_ERRORS as exc:
            # The database went away under the task: not the task's failure, nor an attempt.
            self._defer_if_outage(exc)
            raise
        finally:
            spawned = getattr(self.request, "spawned_children", False)
            self.pop_request()
            _task_stack.pop()
            if spawned:  # told to on_success, which sees the worker's request, not this copy
                setattr(self.request, "spawned_children", True)  # noqa: B010

    # --- progress -----------------------------------------------------------

    def report_progress(self, percent: float, message: str = "") -> None:
        """Records progress (0-100) in the result backend, state PROGRESS."""
        percent = max(0.0, min(100.0, float(percent)))
        if self.request.id and not self.request.called_directly:
            self.update_state(state="PROGRESS", meta={"percent": round(percent, 1), "message": message})

    # --- retries ------------------------------------------------------------

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: Exception | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        if countdown is None and eta is None:
            wait = self.policy.wait(self.request.retries or 0, retry_after=asked_wait(exc))
            countdown = retries.scaled(wait)
        headers = self.carried_headers()
        headers.setdefault(FIRST_FAILURE_HEADER, timezone.now().isoformat())
        # A retry is a new message: its deliveries are counted afresh.
        headers.pop(DELIVERY_COUNT_HEADER, None)
        options["headers"] = {**headers, **options.get("headers", {})}
        limit = self.max_retries if max_retries is None else max_retries
        if (
            countdown is not None
            and eta is None
            and countdown > settings.JOBS_BROKER_MAX_DELAY_SECONDS
            and args is None
            and kwargs is None
            and (limit is None or (self.request.retries or 0) + 1 <= limit)
            and self._hold_retry(countdown, options["headers"], exc)
        ):
            held = Retry(exc=exc, when=timezone.now() + timedelta(seconds=countdown))
            if throw:
                raise held
            return held
        return super().retry(
            args,
            kwargs,
            exc=exc,
            throw=throw,
            eta=eta,
            countdown=countdown,
            max_retries=max_retries,
            **options,
        )

    def _hold_retry(self, countdown: float, headers: Mapping[str, Any], exc: BaseException | None) -> bool:
        """Holds a long wait in the job's row (status retrying, due `countdown` seconds from now):
        an ETA message would sit in a worker for that long, past the Redis visibility timeout or
        RabbitMQ's consumer timeout. `default.release_jobs` sends it when due, with this retry's
        number and headers. False (the broker holds it after all) for a task without a row, or
        when the row cannot be written; True, sending nothing, when the job was cancelled."""
        job_id = self.request_header(JOB_HEADER)
        if job_id is None or not reliability.in_worker(self.request) or not self.request.id:
            return False
        from jobs import tracking

        kept = {name: headers[name] for name in (FIRST_FAILURE_HEADER, REPLAY_HEADER) if name in headers}
        try:
            held = tracking.hold_retry(str(job_id), self.request.id, countdown, kept, exc)
        except Exception:
            logger.exception("%s[%s]: could not hold the retry in the database", self.name, self.request.id)
            return False
        if not held:  # cancelled meanwhile: there is nothing to retry, and nothing is sent
            logger.info("%s[%s]: job %s was cancelled; not retried", self.name, self.request.id, job_id)
            return True
        logger.info(
            "%s[%s]: retry %d held in the database for %.0f s (JOBS_BROKER_MAX_DELAY_SECONDS is %s)",
            self.name,
            self.request.id,
            (self.request.retries or 0) + 1,
            countdown,
            settings.JOBS_BROKER_MAX_DELAY_SECONDS,
        )
        return True

    def request_header(self, name: str) -> Any:
        return getattr(self.request, name, None) or (self.request.headers or {}).get(name)

    def delivery_count(self) -> int:
        """How many times this message was delivered: 1 the first time.

        Kept by the Redis transport (delivery/redis.py, `x_delivery_count`) and by RabbitMQ's
        quorum queues (`x-delivery-count`, the redeliveries before this one).
        """
        counted = self.request_header(DELIVERY_COUNT_HEADER)
        if counted is not None:
            return max(1, int(counted))
        redeliveries = self.request_header("x-delivery-count")
        return int(redeliveries) + 1 if redeliveries is not None else 1

    def carried_headers(self) -> dict[str, Any]:
        """The message's headers, with ours, for a message that carries this one on."""
        headers = dict(self.request.headers or {})
        for name in (
            FIRST_FAILURE_HEADER,
            REPLAY_HEADER,
            JOB_HEADER,
            PARENT_HEADER,
            DEFERRED_HEADER,
            RESENT_HEADER,
        ):
            value = getattr(self.request, name, None) or headers.get(name)
            if value is not None:
                headers[name] = value
        return headers

    # --- database outages (tasks.reliability) -------------------------------

    def defer_for_outage(self, exc: BaseException) -> None:
        reliability.defer_for_outage(self, exc, self.carried_headers())

    @property
    def deferred(self) -> bool:
        """This delivery was sent again because the database was away: record nothing more."""
        return bool(getattr(self.request, "_deferred", False))

    def _defer_if_outage(self, exc: BaseException) -> None:
        """Sends the message again and ends this delivery quietly when `exc` is an outage."""
        if reliability.in_worker(self.request) and reliability.is_outage(exc):
            from celery.exceptions import Ignore

            self.defer_for_outage(exc)
            raise Ignore() from None

    # --- jobs sent through the API (jobs.tracking) ---------------------------

    def _check_deliveries(self, deliveries: int) -> None:
        if deliveries > settings.JOBS_MAX_DELIVERIES:
            raise DeliveryLimitExceeded(
                f"{self.name}: delivered {deliveries} times (JOBS_MAX_DELIVERIES is "
                f"{settings.JOBS_MAX_DELIVERIES}); each time, the worker running it was lost "
                "(killed, out of memory, or past the hard time limit). Not run again: replay the "
                "dead letter once the cause is fixed."
            )

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        from celery.exceptions import Ignore

        if self.deferred:  # the STARTED state could not be written: this delivery ends here
            raise Ignore()
        from jobs import connections, tracking

        job_id = self.request_header(JOB_HEADER)
        # A message that kills whatever runs it (out of memory, a crash, the hard time limit) would
        # otherwise go round for ever: it fails for good and leaves a dead letter. Unless its job
        # is done already (its workers died after its outcome, before the ack) or ran again under
        # a new task id: then it is a duplicate like any other, skipped without a dead letter.
        deliveries = self.delivery_count()
        if deliveries > settings.JOBS_MAX_DELIVERIES and tracking.done_with(
            None if job_id is None else str(job_id), task_id
        ):
            self.backend.mark_as_revoked(task_id, reason="job already handled", request=self.request)
            raise Ignore()
        self._check_deliveries(deliveries)
        # A copy sent again during a database outage may find its row still running.
        redelivered = bool((self.request.delivery_info or {}).get("redelivered")) or any(
            self.request_header(name) for name in (DEFERRED_HEADER, RESENT_HEADER)
        )
        attempt = (self.request.retries or 0) + 1
        # The broker delivered this very message before (its worker died): the row counts it.
        counted = bool((self.request.delivery_info or {}).get("redelivered"))
        # One claim time for this delivery, sent again with a claim repeated on a new connection:
        # a row already holding it was claimed by the first try (jobs.tracking.claim).
        at = timezone.now()
        try:
            if job_id is None:
                # Sent with plain apply_async (or by beat): the job's record is made now, and
                # travels with its retries from here on.
                delivery = self.request.delivery_info or {}
                arguments = self.bind_arguments(args or (), kwargs or {})
                recorded = connections.claiming(
                    lambda again: tracking.record_and_claim(
                        self.name,
                        task_id,
                        brokers.queue_of(delivery.get("routing_key")),
                        arguments,
                        attempt,
                        redelivered or again,
                        priority=delivery.get("priority"),
                        counted=counted,
                        at=at,
                    )
                )
                job_id, row_deliveries = recorded if recorded is not None else (None, 0)
                if job_id is not None:
                    setattr(self.request, JOB_HEADER, job_id)
            else:
                known = str(job_id)
                row_deliveries = connections.claiming(
                    lambda again: tracking.claim(
                        known, task_id, attempt, redelivered or again, counted=counted, at=at
                    )
                )
            claimed = row_deliveries > 0
        except reliability.DATABASE_ERRORS as exc:
            self._defer_if_outage(exc)
            raise
        # A broker that counts no deliveries (RabbitMQ's classic queues): the job's row did.
        self._check_deliveries(row_deliveries)
        if not claimed:
            # Cancelled (or already done): the result says so, and the message is acknowledged.
            self.backend.mark_as_revoked(
                task_id, reason="job cancelled or already handled", request=self.request
            )
            raise Ignore()

    # --- children (jobs.tree) --------------------------------------------------------

    def spawn(self, children: Iterable[tuple[Any, ...]]) -> list[Any]:
        """Sends child jobs of this job: `(task, kwargs)` or `(task, kwargs, countdown)` each.

        The children are recorded in one INSERT with this job as their parent and sent in one
        batch; this job is final only once they all are (jobs.tree). Their arguments are checked
        here, so a bad child fails this task, not a worker later. Running again (a retry, a
        redelivery), the same call finds the children already there and sends none twice.
        """
        from jobs import tree

        specs = []
        for child in children:
            task, kwargs, *rest = child
            name = task if isinstance(task, str) else task.name
            target = self.app.tasks[name]
            if isinstance(target, JobTask):
                target.validate_arguments((), kwargs)
            specs.append(tree.ChildSpec(name, kwargs, float(rest[0]) if rest else 0.0))
        if not specs:
            return []
        job_id = self.request_header(JOB_HEADER)
        setattr(self.request, "spawned_children", True)  # noqa: B010 (Context declares no such field)
        return tree.spawn(None if job_id is None else str(job_id), self.request.id or uuid_text(), specs)

    def partially_failed_because(self, result: Any) -> str | None:
        """Why a run that returned `result` did part of its work only (the job is then
        partially_failed); None when it did all of it. Families whose tasks report per-item
        failures in their result say so here (email.send_batch: refused recipients)."""
        return None

    def _track(self, what: str, *args: Any, **options: Any) -> bool:
        """Records the outcome in the job's row; False when the database was away (deferred)."""
        job_id = self.request_header(JOB_HEADER)
        if job_id is None:
            return True
        from jobs import tracking

        try:
            getattr(tracking, what)(str(job_id), self.request.id, *args, **options)
        except reliability.DATABASE_ERRORS as exc:
            if what != "retrying" and reliability.in_worker(self.request) and reliability.is_outage(exc):
                self.defer_for_outage(exc)  # the outcome is not recorded: run it again later
                return False
            logger.exception("could not record %s for job %s", what, job_id)
        except Exception:  # bookkeeping never hides the task's own outcome
            logger.exception("could not record %s for job %s", what, job_id)
        return True

    def on_retry(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        self._track("retrying", exc, attempt=(self.request.retries or 0) + 1)

    def on_cancelled(self, task_id: str, args: Any, kwargs: Any) -> None:
        """A job of this task was cancelled through the API: called where its row became `cancelled`
        (the API for a job that was not running; for a running one, the worker's main process once
        the run was terminated, or whatever found it stopped: jobs.tracking.cancelled_while_running),
        never in the terminated run itself. Tasks with records of their own close them."""

    # --- outcomes -----------------------------------------------------------

    def _outcome_recorded(self) -> bool:
        """The result backend wrote this run's outcome to the job's row (tasks.backends)."""
        return bool(getattr(self.request, "job_outcome_recorded", False))

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if self.deferred:
            return
        if not self._outcome_recorded() and not self._track(
            "failed", exc, parent_id=self.request_header(PARENT_HEADER)
        ):
            return
        from tasks import deadletters

        try:
            deadletters.record_failure(self, exc, task_id, args, kwargs, einfo)
        except reliability.DATABASE_ERRORS as db_exc:
            if reliability.in_worker(self.request) and reliability.is_outage(db_exc):
                self.defer_for_outage(db_exc)
            else:
                logger.exception("could not store a dead letter for %s[%s]", self.name, task_id)
        except Exception:  # never let bookkeeping hide the task's own failure
            logger.exception("could not store a dead letter for %s[%s]", self.name, task_id)

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        if self.deferred:
            return
        # Written by the result backend with the result; here only when it was not (ignore_result).
        tracked = self._outcome_recorded() or self._track(
            "succeeded",
            retval,
            spawned=bool(getattr(self.request, "spawned_children", False)),
            partial=self.partially_failed_because(retval),
            parent_id=self.request_header(PARENT_HEADER),
        )
        if not tracked:
            return
        dead_letter_id = self.request_header(REPLAY_HEADER)
        if dead_letter_id is None:
            return
        from tasks import deadletters

        try:
            deadletters.record_replay_success(int(dead_letter_id))
        except Exception:
            logger.exception("could not mark dead letter %s as replayed", dead_letter_id)
