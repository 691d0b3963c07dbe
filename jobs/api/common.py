"""Small pieces the routers share: error bodies, response maps, cursors."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from pydantic_core import PydanticCustomError

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


# A cursor is `<microseconds since 1970 UTC>_<primary key>`: every string its pattern matches is one
# the API can read (no 400 for a schema-valid cursor), and the pattern is what the document shows.
# 16 digits reach the year 2286; 18-digit keys stay under PostgreSQL's bigint.
JOB_CURSOR = r"^[0-9]{1,16}_[0-9a-f]{32}$"  # a UUID's 32 hex digits
DEAD_LETTER_CURSOR = r"^[0-9]{1,16}_[0-9]{1,18}$"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


def encode_cursor(at: datetime, pk: Any) -> str:
    return f"{(at - EPOCH) // MICROSECOND}_{pk.hex if isinstance(pk, UUID) else pk}"


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    micros, _, pk = cursor.partition("_")
    if not (micros.isascii() and micros.isdigit() and len(micros) <= 16 and pk):
        raise _bad_cursor()
    return EPOCH + int(micros) * MICROSECOND, pk


def cursor_pattern(pattern: str) -> Callable[[Any], Any]:
    """A before-validator for a `cursor` query field: not matching `pattern` is a 400 in plain words."""

    def check(value: Any) -> Any:
        if value is not None and not (isinstance(value, str) and re.fullmatch(pattern, value)):
            raise PydanticCustomError("cursor", "is not a cursor this API gave out")
        return value

    return check


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
