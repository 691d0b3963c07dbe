"""Small pieces the routers share: error bodies, response maps, cursors."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.db.models import Q, QuerySet
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


def _bad_cursor() -> ApiError:
    message = "is not a cursor this API gave out"
    return ApiError(400, f"field 'cursor': {message}", [{"field": "cursor", "message": message}])


def encode_cursor(at: datetime, pk: Any) -> str:
    return base64.urlsafe_b64encode(f"{at.isoformat()}|{pk}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, pk = text.split("|", 1)
        at = parse_datetime(stamp)
    except Exception:
        at = None
    if at is None:
        raise _bad_cursor()
    return at, pk


def keyset_page(
    rows: QuerySet[Any], *, by: str, limit: int, cursor: str | None, pk_type: Callable[[str], Any]
) -> dict[str, Any]:
    """One page of `rows`, newest `by` first (ties: highest pk first), and the cursor of the next.

    Keyset, not offset: a page is one index range scan however deep, and rows written
    meanwhile neither repeat nor go missing.
    """
    if cursor:
        at, raw_pk = decode_cursor(cursor)
        try:
            pk = pk_type(raw_pk)
        except ValueError:
            raise _bad_cursor() from None
        rows = rows.filter(Q(**{f"{by}__lt": at}) | Q(**{by: at, "pk__lt": pk}))
    page = list(rows.order_by(f"-{by}", "-pk")[: limit + 1])
    more = len(page) > limit
    page = page[:limit]
    return {"items": page, "next_cursor": encode_cursor(getattr(page[-1], by), page[-1].pk) if more else None}
