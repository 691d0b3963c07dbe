"""API tokens: made once, shown once, stored as a SHA-256 hash, looked up by it."""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connection
from django.utils import timezone

from jobs import sql
from jobs.models import ApiToken

TOKEN_PREFIX = "jobs_"  # noqa: S105  (a marker that makes leaked tokens easy to grep for, not a secret)
# last_used_at is written at most this often per token, not on every request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def create_token(user: Any, name: str = "") -> tuple[ApiToken, str]:
    """Returns the new token row and the token itself (it is not stored, so it cannot be shown again)."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(user=user, name=name, prefix=raw[:12], key_hash=hash_token(raw))
    return token, raw


def authenticate(raw: str) -> ApiToken | None:
    """The active token for `raw`, or None (unknown, revoked, or its user deactivated)."""
    if not raw or len(raw) > 200:
        return None
    digest = hash_token(raw)
    token = _with_user(digest)
    # The lookup is by hash (an index); compare again in constant time for good measure.
    if token is None or not hmac.compare_digest(token.key_hash, digest) or not token.user.is_active:
        return None
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token


def _with_user(digest: str) -> ApiToken | None:
    """The unrevoked token whose hash is `digest`, its user loaded with it (one query).

    Every API request asks this first. On PostgreSQL the statement is SQL of its own, built once
    (jobs.sql), and the rows become model instances as the ORM makes them (`from_db`): building it
    through the ORM (select_related, first) cost about a quarter of a `POST /api/jobs`. Elsewhere
    the ORM, whose converters other databases need (SQLite's text dates)."""
    if connection.vendor != "postgresql":
        return (
            ApiToken.objects.select_related("user").filter(key_hash=digest, revoked_at__isnull=True).first()
        )
    user_model = get_user_model()
    token_columns, user_columns = _columns(ApiToken), _columns(user_model)

    def build() -> str:
        token, user = sql.table(ApiToken), sql.table(user_model)
        selected = [f"{token}.{c}" for _, c in token_columns] + [f"{user}.{c}" for _, c in user_columns]
        user_id, user_pk = sql.column(ApiToken, "user"), sql.column(user_model, user_model._meta.pk.name)
        key_hash, revoked_at = sql.column(ApiToken, "key_hash"), sql.column(ApiToken, "revoked_at")
        return (
            f"SELECT {', '.join(selected)} FROM {token} JOIN {user} ON {user}.{user_pk} = {token}.{user_id} "  # noqa: S608
            f"WHERE {token}.{key_hash} = %s AND {token}.{revoked_at} IS NULL LIMIT 1"
        )

    with connection.cursor() as cursor:
        cursor.execute(sql.statement(("token with user", user_model._meta.label), build), [digest])
        row = cursor.fetchone()
    if row is None:
        return None
    split = len(token_columns)
    token = ApiToken.from_db(connection.alias, [name for name, _ in token_columns], row[:split])
    token.user = user_model.from_db(connection.alias, [name for name, _ in user_columns], row[split:])
    return token


@functools.cache
def _columns(model: Any) -> list[tuple[str, str]]:
    """(attname, quoted column) of each of `model`'s concrete fields, in the ORM's order (PostgreSQL's
    quoting: asked only there)."""
    return [(f.attname, connection.ops.quote_name(f.column)) for f in model._meta.concrete_fields]


def revoke(token: ApiToken) -> None:
    ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
