"""API tokens: made once, shown once, stored as a SHA-256 hash, looked up by it."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta
from typing import Any

from django.utils import timezone

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
    token = ApiToken.objects.select_related("user").filter(key_hash=digest, revoked_at__isnull=True).first()
    # The lookup is by hash (an index); compare again in constant time for good measure.
    if token is None or not hmac.compare_digest(token.key_hash, digest) or not token.user.is_active:
        return None
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token


def revoke(token: ApiToken) -> None:
    ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
