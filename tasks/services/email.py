"""Templated email over Django's email backend, logged per message so nothing is sent twice.

A template is a folder under `templates/email/<name>/` holding `subject.txt`,
`body.txt` and `body.html`. Every message has a row in `EmailLog` keyed by an
idempotency key: a retry, a redelivery after a crash or a second newsletter
run finds the row and does not send again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import smtplib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.mail import EmailMultiAlternatives, get_connection
from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.utils import DNS_NAME
from django.db import DatabaseError, transaction
from django.db import connection as database
from django.db.models import F
from django.template import TemplateDoesNotExist
from django.template.loader import get_template, render_to_string
from django.utils import timezone
from limits import RateLimitItem, parse, storage, strategies

from jobs import commits, sql
from jobs.commits import unflushed
from tasks.base import PermanentJobError, TransientJobError, mask_email
from tasks.models import EmailLog

logger = logging.getLogger(__name__)

TEMPLATE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*(/[a-z0-9][a-z0-9_-]*)*$")
_ADDRESS = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")


def mask_addresses(text: str) -> str:
    """Masks every email address in a piece of text (SMTP replies quote the recipient)."""
    return _ADDRESS.sub(lambda found: mask_email(found.group(0)), text)


# --- rendering ------------------------------------------------------------------


TEMPLATE_PARTS = ("subject.txt", "body.txt", "body.html")


def missing_template_parts(template: str) -> list[str]:
    """The files of template `template` that the template loaders cannot find (none: it can be sent)."""
    missing = []
    for part in TEMPLATE_PARTS:
        try:
            get_template(f"email/{template}/{part}")
        except TemplateDoesNotExist:
            missing.append(part)
    return missing


def template_names() -> list[str]:
    """Every template that can be sent: directories under `email/` of any template directory that
    hold the three parts (what the OpenAPI document lists as the choices for `template`)."""
    from django.template import engines

    found: set[str] = set()
    for engine in engines.all():
        for directory in getattr(engine, "template_dirs", ()):
            root = Path(directory) / "email"
            for subject in root.rglob(TEMPLATE_PARTS[0]) if root.is_dir() else ():
                name = subject.parent.relative_to(root).as_posix()
                if TEMPLATE_NAME.match(name) and not missing_template_parts(name):
                    found.add(name)
    return sorted(found)


def render(template: str, context: dict[str, Any]) -> tuple[str, str, str]:
    """(subject, text body, HTML body) of a template pair."""
    if not TEMPLATE_NAME.match(template):
        raise PermanentJobError(f"template {template!r} is not a valid template name")
    try:
        subject = render_to_string(f"email/{template}/subject.txt", context)
        text = render_to_string(f"email/{template}/body.txt", context)
        html = render_to_string(f"email/{template}/body.html", context)
    except TemplateDoesNotExist as exc:
        raise PermanentJobError(f"email template {template!r} is missing {exc}") from None
    # A header injection through the context must not survive into the subject.
    return " ".join(subject.split()), text, html


def message_id_for(key: str) -> str:
    """The same key always gives the same Message-ID, so a duplicate is recognisable downstream."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"<{digest}@{DNS_NAME}>"


def build_message(to: str, template: str, context: dict[str, Any], key: str) -> EmailMultiAlternatives:
    subject, text, html = render(template, context)
    message = EmailMultiAlternatives(
        subject=subject,
        body=text,
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[to],
        headers={"Message-ID": message_id_for(key)},
    )
    message.attach_alternative(html, "text/html")
    return message


# --- errors -----------------------------------------------------------------------


# A 4xx reply that says when to come back (greylisting: Postgrey's "Greylisted for 300 seconds",
# "try again in 5 minutes", "retry after 60s", "come back in 00:05:00"). The first of these in the
# reply sets the retry's least wait (bounded by the family's cap: tasks.retries).
_WAIT_IN_UNITS = re.compile(
    r"\b(?:in|after|for)\s+(\d{1,6})\s*(seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h)\b", re.IGNORECASE
)
_WAIT_AS_CLOCK = re.compile(r"\b(?:in|after|for)\s+(\d{1,2}):(\d{2})(?::(\d{2}))?\b", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


def retry_after_from_reply(text: str) -> float | None:
    """Seconds an SMTP reply asks the sender to wait before trying again, or None if it does not say."""
    clock = _WAIT_AS_CLOCK.search(text)
    units = _WAIT_IN_UNITS.search(text)
    if clock and (not units or clock.start() < units.start()):
        first, second, third = clock.groups()
        if third is None:  # mm:ss
            return float(int(first) * 60 + int(second))
        return float(int(first) * 3600 + int(second) * 60 + int(third))
    if units:
        unit = units.group(2).lower()
        return float(int(units.group(1)) * _UNIT_SECONDS["h" if unit.startswith("h") else unit[0]])
    return None


def _reply_text(reply: bytes | str) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)


def classify_smtp_error(exc: BaseException) -> Exception:
    """TransientJobError for what may work later (connection trouble, 4xx), else PermanentJobError.

    A 4xx reply that says when to try again ("try again in 300 seconds") sets the error's
    `retry_after`: the retry waits at least that long."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        reply = "; ".join(f"{code} {msg!r}" for code, msg in exc.recipients.values())
        text = mask_addresses(f"recipient refused: {reply}")
        if codes and all(400 <= code < 500 for code in codes):
            waits = [retry_after_from_reply(_reply_text(msg)) for _, msg in exc.recipients.values()]
            asked = [wait for wait in waits if wait is not None]
            return TransientJobError(text, retry_after=max(asked) if asked else None)
        return PermanentJobError(text)
    if isinstance(exc, smtplib.SMTPResponseException):
        detail = _reply_text(exc.smtp_error)
        text = mask_addresses(f"SMTP {exc.smtp_code}: {detail}")
        if 400 <= exc.smtp_code < 500:
            return TransientJobError(text, retry_after=retry_after_from_reply(detail))
        return PermanentJobError(text)
    if isinstance(exc, smtplib.SMTPServerDisconnected | smtplib.SMTPConnectError | OSError | TimeoutError):
        return TransientJobError(f"SMTP connection failed: {type(exc).__name__}: {mask_addresses(str(exc))}")
    return PermanentJobError(f"SMTP error: {type(exc).__name__}: {mask_addresses(str(exc))}")


# --- the sent-message log -------------------------------------------------------


def send_logged(
    *,
    key: str,
    to: str,
    template: str,
    context: dict[str, Any],
    campaign: str = "",
    connection: BaseEmailBackend | None = None,
    replay: bool = False,
) -> str:
    """Sends one message unless its log row says it went already; returns the outcome.

    "sent", or "already-sent" when an earlier attempt delivered it. A row left
    in SENDING means an earlier attempt died inside the SMTP conversation: it
    may or may not have been delivered, so it is not sent again unless a person
    replays it from the dead letters (`replay=True`).
    """
    with transaction.atomic():
        log, _ = EmailLog.objects.select_for_update().get_or_create(
            key=key, defaults={"recipient": to, "template": template, "campaign": campaign}
        )
        if log.status == EmailLog.Status.SENT:
            return "already-sent"
        cut_off = log.status in (EmailLog.Status.SENDING, EmailLog.Status.UNKNOWN) and not replay
        if cut_off:
            log.status = EmailLog.Status.UNKNOWN
            log.save(update_fields=["status", "updated_at"])
        else:
            message = build_message(to, template, context, key)
            log.subject = str(message.subject)
            log.message_id = message.extra_headers["Message-ID"]
            log.status = EmailLog.Status.SENDING
            log.attempts += 1
            log.save(update_fields=["subject", "message_id", "status", "attempts", "updated_at"])
    if cut_off:
        raise PermanentJobError(
            f"email {mask_addresses(key)}: an earlier attempt was cut off while sending, so it may have been "
            "delivered; not sending again. Check with the recipient, then replay the dead letter."
        )

    try:
        (connection or get_connection(fail_silently=False)).send_messages([message])
    except Exception as exc:
        error = classify_smtp_error(exc)
        failed = isinstance(error, PermanentJobError)
        EmailLog.objects.filter(pk=log.pk).update(
            status=EmailLog.Status.FAILED if failed else EmailLog.Status.PENDING,
            last_error=str(error)[:2000],
            updated_at=timezone.now(),
        )
        logger.warning("email %s to %s not sent: %s", mask_addresses(key), mask_email(to), error)
        raise error from exc
    EmailLog.objects.filter(pk=log.pk).update(
        status=EmailLog.Status.SENT, sent_at=timezone.now(), last_error="", updated_at=timezone.now()
    )
    logger.info("email %s sent to %s", mask_addresses(key), mask_email(to))
    return "sent"


# --- the global send rate ---------------------------------------------------------


class SendRateLimiter:
    """A send rate shared by every worker on every machine.

    Celery's `rate_limit` is per worker process; this one keeps its moving
    window in Redis (the `limits` library, an atomic Lua script), so N workers
    together never exceed EMAIL_SEND_RATE.
    """

    def __init__(self, rate: str, storage_url: str, name: str = "email") -> None:
        self.item: RateLimitItem = parse(rate)
        self.limiter = strategies.MovingWindowRateLimiter(storage.storage_from_string(storage_url))
        self.name = name

    @property
    def group(self) -> int:
        """How many slots a batch may take in one go: a tenth of the window's budget (one at the
        default 10/second), so a batch's sends bunch up by at most that much, and a fast rate
        costs one Redis round trip per group of messages rather than per message."""
        return max(1, int(self.item.amount) // 10)

    def try_acquire(self, count: int = 1) -> bool:
        return bool(self.limiter.hit(self.item, self.name, cost=count))

    def acquire(self, timeout: float = 60.0, count: int = 1) -> None:
        """Waits for `count` slots together; TransientJobError if they do not come within `timeout` s."""
        deadline = time.monotonic() + timeout
        while not self.try_acquire(count):
            reset_at = self.limiter.get_window_stats(self.item, self.name).reset_time
            wait = min(max(reset_at - time.time(), 0.01), 1.0)
            if time.monotonic() + wait > deadline:
                raise TransientJobError(f"no send slot within {timeout:.0f}s (EMAIL_SEND_RATE)")
            time.sleep(wait)


_limiters: dict[tuple[str, str], SendRateLimiter] = {}


def send_rate_limiter() -> SendRateLimiter:
    """The process's limiter for the current settings (one Redis connection pool per process)."""
    config = (settings.EMAIL_SEND_RATE, settings.RATE_LIMIT_STORAGE_URL)
    if config not in _limiters:
        _limiters[config] = SendRateLimiter(*config)
    return _limiters[config]


# --- newsletters ------------------------------------------------------------------


def plan_batches(
    recipients: Iterable[str], batch_size: int, window_seconds: float
) -> list[tuple[float, list[str]]]:
    """Splits recipients into batches and gives each a start offset, spread evenly over the window.

    The first batch starts at once and the last at most `window_seconds` later;
    duplicates (case-insensitive) are dropped, first one kept.
    """
    seen: set[str] = set()
    unique = []
    for address in recipients:
        if address.lower() not in seen:
            seen.add(address.lower())
            unique.append(address)
    batches = [unique[i : i + batch_size] for i in range(0, len(unique), batch_size)]
    spacing = window_seconds / len(batches) if batches else 0.0
    return [(round(index * spacing, 3), batch) for index, batch in enumerate(batches)]


@dataclass
class BatchOutcome:
    sent: int = 0
    already_sent: int = 0
    failed: list[str] = field(default_factory=list)
    # Of `failed`: cut off while sending in an earlier attempt (log row `unknown`), not refused.
    unknown: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "already_sent": self.already_sent,
            "failed": len(self.failed),
            "unknown": self.unknown,
        }


# Messages of a batch whose log rows are made together (`pending`, in one INSERT; those an earlier
# attempt made are read back). Each is then taken (`sending`) on its own just before SMTP gets it,
# so a worker killed in the middle leaves only the message it was sending `unknown`.
LOG_CHUNK_SIZE = 50

# Tags that read nothing from the context but what the template names: a template using only
# these, and never naming `recipient`, renders the same for every recipient of a batch.
_CONTEXT_FREE_TAGS = frozenset(
    [
        "if",
        "elif",
        "else",
        "endif",
        "for",
        "empty",
        "endfor",
        "with",
        "endwith",
        "autoescape",
        "endautoescape",
        "spaceless",
        "endspaceless",
        "comment",
        "endcomment",
        "filter",
        "endfilter",
        "firstof",
        "cycle",
        "resetcycle",
        "ifchanged",
        "endifchanged",
        "templatetag",
        "verbatim",
        "endverbatim",
        "widthratio",
        "now",
        "lorem",
    ]
)
_TAG = re.compile(r"\{%-?\s*(\w+)")


def renders_alike_for_every_recipient(template: str) -> bool:
    """True when none of the template's parts can tell one recipient from another.

    Conservative: any part that names `recipient`, or uses a tag outside Django's plain ones
    (`include`, `extends`, `load`, `debug`...: they may read the whole context), or is not a
    Django template, is rendered per recipient.
    """
    for part in TEMPLATE_PARTS:
        try:
            source = get_template(f"email/{template}/{part}").template.source  # type: ignore[attr-defined]
        except (TemplateDoesNotExist, AttributeError):
            return False
        if not isinstance(source, str) or "recipient" in source:
            return False
        if any(tag not in _CONTEXT_FREE_TAGS for tag in _TAG.findall(source)):
            return False
    return True


@dataclass
class _Pending:
    """One message of a batch: its log key, address and the message to send."""

    key: str
    address: str
    message: EmailMultiAlternatives


def _messages(campaign: str, template: str, recipients: list[str], context: dict[str, Any]) -> list[_Pending]:
    """The batch's messages, each keyed campaign:address (the first of duplicate addresses kept).

    Rendered once for the batch when the template cannot tell recipients apart, else per recipient.
    """
    shared = (
        render(template, {**context, "recipient": ""})
        if renders_alike_for_every_recipient(template)
        else None
    )
    pending: list[_Pending] = []
    seen: set[str] = set()
    for address in recipients:
        key = f"{campaign}:{address.lower()}"
        if key in seen:
            continue
        seen.add(key)
        subject, text, html = shared or render(template, {**context, "recipient": address})
        message = EmailMultiAlternatives(
            subject=subject,
            body=text,
            from_email=settings.DEFAULT_FROM_EMAIL,
            to=[address],
            headers={"Message-ID": message_id_for(key)},
        )
        message.attach_alternative(html, "text/html")
        pending.append(_Pending(key, address, message))
    return pending


def _claim(chunk: list[_Pending], campaign: str, template: str, outcome: BatchOutcome) -> list[_Pending]:
    """Makes the chunk's log rows (one transaction, a few statements for the whole chunk) and returns
    the messages still to send; counts those sent already, and those an earlier attempt was cut off
    sending (`unknown`: may have been delivered, so not sent again)."""
    now = timezone.now()
    with transaction.atomic():
        EmailLog.objects.bulk_create(
            [
                EmailLog(
                    key=item.key,
                    recipient=item.address,
                    template=template,
                    campaign=campaign,
                    subject=str(item.message.subject)[:255],
                    message_id=item.message.extra_headers["Message-ID"],
                )
                for item in chunk
            ],
            ignore_conflicts=True,
        )
        rows = {
            key: (pk, status, subject)
            for key, pk, status, subject in EmailLog.objects.select_for_update()
            .filter(key__in=[item.key for item in chunk])
            .values_list("key", "pk", "status", "subject")
        }
        cut_off: list[int] = []
        claimed: list[_Pending] = []
        resubjected: list[EmailLog] = []
        for item in chunk:
            pk, status, subject = rows[item.key]
            if status == EmailLog.Status.SENT:
                outcome.already_sent += 1
            elif status in (EmailLog.Status.SENDING, EmailLog.Status.UNKNOWN):
                cut_off.append(pk)
                outcome.failed.append(item.address)
                outcome.unknown += 1
                logger.warning(
                    "email %s to %s: an earlier attempt was cut off while sending, so it may have been "
                    "delivered; not sending again (its log row says unknown)",
                    mask_addresses(item.key),
                    mask_email(item.address),
                )
            else:
                claimed.append(item)
                if subject != str(item.message.subject)[:255]:  # a retry with another context
                    resubjected.append(EmailLog(pk=pk, subject=str(item.message.subject)[:255]))
        if cut_off:
            EmailLog.objects.filter(pk__in=cut_off).update(status=EmailLog.Status.UNKNOWN, updated_at=now)
        if resubjected:
            EmailLog.objects.bulk_update(resubjected, ["subject"])
    return claimed


_TAKEABLE = (EmailLog.Status.PENDING, EmailLog.Status.FAILED)  # refused before: a retry tries it again


def _take(item: _Pending, sent: _Pending | None = None) -> bool:
    """Marks one message `sending` just before it goes to SMTP (a durable commit: a crash after it
    leaves the row `sending`, unknown to the retry, never sent twice); False if another attempt of
    the batch took it first. The chunk's other rows stay `pending` until their turn, so a worker
    killed mid-chunk leaves only the message it was sending unknown.

    `sent`: the message before it, which SMTP took; marked `sent` in the same commit, the next
    write after its send whichever way it goes (on PostgreSQL one simple query, one round trip
    for both), so a crash leaves it `sending` in the same window as a write of its own would."""
    now = timezone.now()
    if sent is not None and commits.one_query(database):
        params: list[Any] = [
            EmailLog.Status.SENT, now, now, sent.key,
            EmailLog.Status.SENDING, now, item.key, *_TAKEABLE,
        ]  # fmt: skip
        with database.cursor() as cursor:
            cursor.execute(sql.statement("email sent, then take", _sent_then_take), params)
            cursor.nextset()
            return int(cursor.rowcount) == 1
    if sent is not None:
        _mark_sent(sent)
    taken = EmailLog.objects.filter(key=item.key, status__in=_TAKEABLE).update(
        status=EmailLog.Status.SENDING, attempts=F("attempts") + 1, updated_at=now
    )
    return taken == 1


def _sent_then_take() -> str:
    table = sql.table(EmailLog)
    status, key, updated = (sql.column(EmailLog, name) for name in ("status", "key", "updated_at"))
    sent_at, error, attempts = (sql.column(EmailLog, name) for name in ("sent_at", "last_error", "attempts"))
    return (
        f"UPDATE {table} SET {status} = %s, {sent_at} = %s, {error} = '', {updated} = %s "  # noqa: S608
        f"WHERE {key} = %s; "
        f"UPDATE {table} SET {status} = %s, {attempts} = {attempts} + 1, {updated} = %s "
        f"WHERE {key} = %s AND {status} IN ({', '.join(['%s'] * len(_TAKEABLE))})"
    )


def _mark_sent(item: _Pending) -> None:
    """One row `sent` on its own, when no message follows it straight away (the last one, one
    before a wait for send slots or before the next chunk's rows). On PostgreSQL the commit does
    not wait for the WAL flush (jobs.commits: a round trip, not a disk flush): a mark lost in a
    crash of PostgreSQL itself leaves the row `sending`, which the retry counts as unknown and
    never sends again."""
    now = timezone.now()
    unflushed(EmailLog.objects.filter(key=item.key)).update(
        status=EmailLog.Status.SENT, sent_at=now, last_error="", updated_at=now
    )


def _note(item: _Pending, status: str, error: str) -> None:
    """What became of a message SMTP did not take: refused for good (`failed`), or pending again."""
    EmailLog.objects.filter(key=item.key).update(
        status=status, last_error=error[:2000], updated_at=timezone.now()
    )


def send_batch(
    *,
    campaign: str,
    template: str,
    recipients: list[str],
    context: dict[str, Any],
    limiter: SendRateLimiter | None = None,
    on_progress: Any = None,
) -> BatchOutcome:
    """Sends one batch over a single SMTP connection, at the global rate.

    The email log's rows are made per chunk of LOG_CHUNK_SIZE messages; each message is marked
    `sending` (a durable commit) just before it goes to SMTP and `sent` by the next write after
    SMTP took it: the next message's `sending`, in the same commit and round trip, or a write of
    its own (no wait for a disk flush) when none follows straight away. A crash never leads to a
    second send: a row left `sending` is `unknown` to the retry, and a killed worker leaves only
    the message it was sending (or the one SMTP had just taken) so.
    A recipient refused for good (5xx) is logged as failed and the batch goes on;
    anything transient stops the batch so the task is retried, and the retry skips
    everyone already sent.
    """
    limiter = limiter or send_rate_limiter()
    outcome = BatchOutcome()
    pending = _messages(campaign, template, recipients, context)
    connection = get_connection(fail_silently=False)
    try:
        connection.open()
    except Exception as exc:
        raise classify_smtp_error(exc) from exc
    done = reported = 0
    held: _Pending | None = None  # SMTP took it; marked `sent` with the next message's `sending`

    def mark_held() -> None:
        nonlocal held
        if held is not None:
            _mark_sent(held)
            held = None

    try:
        for start in range(0, len(pending), LOG_CHUNK_SIZE):
            mark_held()
            chunk = pending[start : start + LOG_CHUNK_SIZE]
            claimed = _claim(chunk, campaign, template, outcome)
            done += len(chunk) - len(claimed)  # sent before, or cut off sending: nothing to do
            slots = 0  # taken from the limiter and not used yet
            for index, item in enumerate(claimed):
                if not slots:
                    slots = min(limiter.group, len(claimed) - index)
                    if not limiter.try_acquire(slots):
                        mark_held()  # before waiting for the slots
                        limiter.acquire(count=slots)
                slots -= 1
                done += 1
                taken, held = _take(item, sent=held), None
                if not taken:  # another attempt of this batch, running at the same time, has it
                    outcome.already_sent += 1
                    continue
                try:
                    connection.send_messages([item.message])
                except Exception as exc:
                    error = classify_smtp_error(exc)
                    logger.warning(
                        "email %s to %s not sent: %s",
                        mask_addresses(item.key),
                        mask_email(item.address),
                        error,
                    )
                    if not isinstance(error, PermanentJobError):
                        # Not sent: pending again, for the retry (the process stopping inside the
                        # SMTP conversation raises no exception here: its row stays `sending`).
                        _note(item, EmailLog.Status.PENDING, str(error))
                        raise error from exc
                    _note(item, EmailLog.Status.FAILED, str(error))
                    outcome.failed.append(item.address)
                else:
                    held = item
                    outcome.sent += 1
                if on_progress and done - reported >= 10:
                    reported = done
                    on_progress(100 * done / len(pending), f"{done}/{len(pending)} recipients")
        mark_held()
        if on_progress and reported < len(pending):
            on_progress(100, f"{len(pending)}/{len(pending)} recipients")
    except BaseException:
        # Whatever stopped the batch, a message SMTP took is `sent` if the database takes it.
        with contextlib.suppress(DatabaseError):
            mark_held()
        raise
    finally:
        connection.close()
    return outcome
