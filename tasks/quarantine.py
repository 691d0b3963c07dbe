"""The quarantine: broker messages no worker can run, kept (size-capped) for a person to look at.

Two ways in:

- `record_message()`: the worker's consumer (tasks/poison.py) found a message it cannot run
  (unknown task, bad envelope, refused content type, undecodable body). The row is written at
  once; when the database cannot take it, the entry goes to the Redis list below instead.
- `drain_transport_quarantine()`: the Redis transport (and the fallback above) push what they
  refuse onto the list `jobs:quarantine:raw` in the broker's Redis, newest first (LPUSH, trimmed
  to 10,000), each entry a JSON object `{"queue", "reason", "size", "body", "at"}`. A periodic
  task moves them into rows, oldest first, a batch at a time (RPOP with a count: two drains at
  once never take the same entry).

Every quarantined message is announced with the `message_quarantined` signal (monitoring counts
it). Logs carry the queue, the reason and the size; never the body.
"""

from __future__ import annotations

import base64
import codecs
import json
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection
from django.dispatch import Signal
from django.utils import timezone

from tasks.models import QuarantinedMessage

logger = logging.getLogger(__name__)

RAW_KEY = "jobs:quarantine:raw"
RAW_MAX_ENTRIES = 10_000
MAX_BODY_BYTES = 64 * 1024
MAX_HEADERS_CHARS = 8 * 1024
DRAIN_BATCH = 100
BASE64_MARK = " [body in base64]"  # on a reason pushed by push_raw whose body is base64 text

# Sent once per quarantined message: sender=QuarantinedMessage, queue, kind, task (or ""), size, source.
message_quarantined = Signal()

Kind = QuarantinedMessage.Kind


def _body_fields(body: bytes | str | None) -> dict[str, Any]:
    """The first MAX_BODY_BYTES of `body` as text (base64 when it is not UTF-8), its size, and
    whether it was cut."""
    # A lone surrogate (JSON allows "\ud800") is kept as the bytes it would be: not UTF-8, so base64.
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body or b"")
    kept = raw[:MAX_BODY_BYTES]
    try:
        # Incremental: a character split by the cap is dropped, not taken for binary.
        text = codecs.getincrementaldecoder("utf-8")().decode(kept, final=len(kept) == len(raw))
        if "\x00" in text:  # PostgreSQL text cannot hold NUL
            raise UnicodeDecodeError("utf-8", kept, 0, 1, "NUL")
        encoding = QuarantinedMessage.BodyEncoding.TEXT
    except UnicodeDecodeError:
        text = base64.b64encode(kept).decode("ascii")
        encoding = QuarantinedMessage.BodyEncoding.BASE64
    return {"body": text, "body_encoding": encoding, "size": len(raw), "truncated": len(raw) > len(kept)}


def _headers_text(headers: Any) -> str:
    if headers is None:
        return ""
    try:
        text = json.dumps(headers, default=repr, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(headers)
    return text[:MAX_HEADERS_CHARS]


def _short(value: Any, limit: int) -> str:
    return value.replace("\x00", "\\x00")[:limit] if isinstance(value, str) else ""


def build(
    *,
    queue: str,
    kind: str,
    reason: str,
    body: bytes | str | None,
    headers: Mapping[str, Any] | None = None,
    content_type: str | None = None,
    content_encoding: str | None = None,
    at: datetime | None = None,
    size: int | None = None,
) -> QuarantinedMessage:
    """An unsaved row for one message; `size` overrides the body's length (a body cut upstream)."""
    fields = _body_fields(body)
    if size is not None:  # the size of the message as received, before anyone cut its body
        fields.update(size=size, truncated=fields["truncated"] or size > fields["size"])
    safe_headers = headers if isinstance(headers, Mapping) else {}
    return QuarantinedMessage(
        quarantined_at=at or timezone.now(),
        queue=_short(queue, 200),
        kind=kind,
        reason=_short(reason, 500) or "no reason given",
        task_name=_short(safe_headers.get("task"), 255),
        task_id=_short(safe_headers.get("id"), 255),
        content_type=_short(content_type, 100),
        content_encoding=_short(content_encoding, 50),
        headers=_headers_text(headers),
        **fields,
    )


def _announce(row: QuarantinedMessage, source: str) -> None:
    try:
        message_quarantined.send(
            sender=QuarantinedMessage,
            queue=row.queue,
            kind=row.kind,
            task=row.task_name,
            size=row.size,
            source=source,
        )
    except Exception:  # a counter never stops the quarantine
        logger.exception("quarantine: a message_quarantined receiver failed")


def record_message(row: QuarantinedMessage, *, redis_client: Any = None) -> str:
    """Stores a row built by `build()`; where it went: "database", "redis" (the database refused:
    the drain moves it later) or "lost" (neither answered; logged as an error)."""
    logger.error(
        "quarantined a message from queue %r: %s (%d bytes, %s); see Quarantined messages in the admin",
        row.queue,
        row.reason,
        row.size,
        row.get_kind_display(),
    )
    try:
        if not connection.in_atomic_block:
            # The consumer is not a request: drop a connection the database closed meanwhile.
            close_old_connections()
        row.save(force_insert=True)
        where = "database"
    except Exception as exc:
        logger.warning(
            "quarantine: the database did not take the message (%s); keeping it in Redis (%s)",
            type(exc).__name__,
            RAW_KEY,
        )
        try:
            push_raw(row, client=redis_client)
            return "redis"  # announced when the drain stores it
        except Exception as redis_exc:
            logger.error(
                "quarantine: Redis did not take the message either (%s); it is lost: queue %r, %s, %d bytes",
                type(redis_exc).__name__,
                row.queue,
                row.reason,
                row.size,
            )
            return "lost"
    _announce(row, "worker")
    return where


# --- the Redis list ----------------------------------------------------------------


def redis_client() -> Any:
    """A client for the broker's Redis, or None when the broker is not Redis (nothing to drain)."""
    url = settings.CELERY_BROKER_URL
    if not url.startswith(("redis://", "rediss://")):
        return None
    import redis

    timeout = settings.CELERY_BROKER_SOCKET_TIMEOUT
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def push_raw(row: QuarantinedMessage, client: Any = None) -> None:
    """Pushes a row onto the raw list in the transport's format (the body as stored: text, or
    base64 text with the reason saying so)."""
    client = client or redis_client()
    if client is None:
        raise RuntimeError("the broker is not Redis: there is no quarantine list")
    reason = row.reason if row.body_encoding == "utf-8" else f"{row.reason}{BASE64_MARK}"
    entry = {
        "queue": row.queue,
        "reason": f"{row.kind}: {reason}",
        "size": row.size,
        "body": row.body,
        "at": row.quarantined_at.timestamp(),
    }
    pipe = client.pipeline(transaction=True)
    pipe.lpush(RAW_KEY, json.dumps(entry))
    pipe.ltrim(RAW_KEY, 0, RAW_MAX_ENTRIES - 1)
    pipe.execute()


def _kind_and_reason(reason: str) -> tuple[str, str]:
    """Entries pushed by `push_raw` start with a kind (`undecodable: ...`); the transport's do not."""
    prefix, _, rest = reason.partition(": ")
    if prefix in Kind.values and rest:
        return prefix, rest
    return Kind.TRANSPORT, reason


def row_from_entry(raw: bytes | str) -> QuarantinedMessage:
    """A row for one raw list entry; an entry that is not the agreed JSON is kept whole, as the body."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        entry = json.loads(text)
        if not isinstance(entry, dict):
            raise ValueError("not an object")
        kind, reason = _kind_and_reason(str(entry.get("reason") or "no reason given"))
        at_value = entry.get("at")
        at = (
            datetime.fromtimestamp(float(at_value), tz=UTC)
            if isinstance(at_value, int | float) and 0 < at_value < 1e11
            else timezone.now()
        )
        size = entry.get("size")
        body = entry.get("body")
        in_base64 = reason.endswith(BASE64_MARK)
        row = build(
            queue=str(entry.get("queue") or ""),
            kind=kind,
            reason=reason.removesuffix(BASE64_MARK),
            body=body if isinstance(body, str) else json.dumps(body),
            at=at,
            size=size if isinstance(size, int) and size >= 0 else None,
        )
        if in_base64:
            row.body_encoding = QuarantinedMessage.BodyEncoding.BASE64
        return row
    except (ValueError, TypeError, OverflowError, OSError):
        return build(
            queue="",
            kind=Kind.TRANSPORT,
            reason=f"an entry of {RAW_KEY} that is not the agreed JSON object; the entry is the body",
            body=raw,
        )


def drain_transport_quarantine(
    client: Any = None, *, batch_size: int = DRAIN_BATCH, max_entries: int = RAW_MAX_ENTRIES
) -> int:
    """Moves entries of the raw list into rows, oldest first; returns how many moved.

    Each batch is popped atomically (RPOP with a count), so two drains at once never store one
    entry twice. When the database refuses a batch, it is pushed back where it was (the oldest
    at the tail again) and the error raised. A process killed between the pop and the insert
    loses that batch (at most `batch_size` entries).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    client = client or redis_client()
    if client is None:
        return 0
    moved = 0
    started = time.monotonic()
    while moved < max_entries:
        popped = client.rpop(RAW_KEY, min(batch_size, max_entries - moved))
        if not popped:
            break
        rows = [row_from_entry(item) for item in popped]
        try:
            QuarantinedMessage.objects.bulk_create(rows)
        except Exception:
            client.rpush(RAW_KEY, *reversed(popped))
            raise
        for row in rows:
            _announce(row, "transport" if row.kind == Kind.TRANSPORT else "worker")
        moved += len(rows)
    if moved:
        logger.info(
            "quarantine: moved %d message(s) from %s into the database in %.2f s",
            moved,
            RAW_KEY,
            time.monotonic() - started,
        )
    return moved
