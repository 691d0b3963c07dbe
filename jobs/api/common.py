"""Small pieces the routers share: error bodies, response maps, cursors."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.utils.dateparse import parse_datetime

from jobs.api.schemas import Error

# Every authenticated operation can answer these.
AUTH_ERRORS: dict[int, Any] = {401: Error}
STAFF_ERRORS: dict[int, Any] = {401: Error, 403: Error}
STAFF_ONLY = {"x-staff-only": True}
# Query strings go to PostgreSQL, whose text cannot hold NUL: refused (400) rather than a 500.
NO_NUL = r"^[^\x00]*$"


class ApiError(Exception):
    def __init__(self, status: int, detail: str, errors: list[dict[str, str]] | None = None, **headers: str):
        super().__init__(detail)
        self.status, self.detail, self.errors, self.headers = status, detail, errors or [], headers


def error_response(request: HttpRequest, error: ApiError) -> HttpResponse:
    from jobs.api import api

    response = api.create_response(
        request, {"detail": error.detail, "errors": error.errors}, status=error.status
    )
    for name, value in error.headers.items():
        response[name.replace("_", "-")] = value
    return response


def encode_cursor(created_at: datetime, pk: Any) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{pk}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, pk = text.split("|", 1)
        created_at = parse_datetime(stamp)
    except Exception:
        created_at = None
    if created_at is None:
        raise ApiError(
            400,
            "field 'cursor': is not a cursor this API gave out",
            [{"field": "cursor", "message": "is not a cursor this API gave out"}],
        )
    return created_at, pk
