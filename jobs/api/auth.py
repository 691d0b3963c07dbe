"""Bearer-token authentication for the API, and the staff-only variant.

Written on ninja's HttpAuthBase rather than its HttpBearer, which logs the
whole Authorization header when it is malformed: no token ever reaches a log.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja.errors import AuthorizationError
from ninja.security.http import HttpAuthBase

from jobs import tokens
from jobs.models import ApiToken


class ApiTokenAuth(HttpAuthBase):
    """`Authorization: Bearer <token>`; a token made in the admin or by `manage.py create_api_token`."""

    openapi_scheme = "bearer"
    staff_only = False

    def __call__(self, request: HttpRequest) -> ApiToken | None:
        scheme, _, raw = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            return None
        token = tokens.authenticate(raw.strip())
        if token is None:
            return None
        if self.staff_only and not token.user.is_staff:
            raise AuthorizationError(message="this operation needs the token of a staff user")
        return token


class StaffTokenAuth(ApiTokenAuth):
    """An API token whose user is staff: retry, cancel, pause, resume and replay need one."""

    staff_only = True


def token_of(request: HttpRequest) -> ApiToken:
    token: Any = getattr(request, "auth", None)
    assert isinstance(token, ApiToken)
    return token
