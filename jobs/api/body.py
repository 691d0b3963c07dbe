"""Reading a request's JSON body: bounded in bytes before it is read, in depth before it is parsed.

Every JSON body the API takes comes through `read_json`, so no body, however large or deep, gets
past here as anything but a 400, 411 or 413 naming the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest

from jobs.api.common import ApiError
from tasks.services import boundedjson

# Arrays and objects in a job's body nest at most this deep (the body itself is level 1, its
# payload level 2); a batch's `{"jobs": [...]}` adds two levels. Documented in docs/security.md.
MAX_DEPTH = boundedjson.MAX_DEPTH


@dataclass(frozen=True)
class Body:
    data: Any
    size: int  # bytes, as sent


def too_large(size: int, limit: int, setting: str, *, what: str = "the body", job_type: str = "") -> ApiError:
    accepted = f"at most {limit} are accepted" + (f" for {job_type}" if job_type else "")
    return ApiError(
        413,
        f"{what} is {size} bytes; {accepted} ({setting})",
        [{"field": "(body)", "message": f"is over {limit} bytes"}],
    )


def read_json(request: HttpRequest, *, limit: int, setting: str, max_depth: int = MAX_DEPTH) -> Body:
    """The body, parsed; 413 over `limit` bytes (before reading it when Content-Length says so),
    411 without a Content-Length, 400 when it is not JSON or nests deeper than `max_depth`."""
    declared = request.META.get("CONTENT_LENGTH") or ""
    if not declared and request.META.get("HTTP_TRANSFER_ENCODING"):
        # Django reads a WSGI body only as far as Content-Length says: a chunked body would be empty.
        raise ApiError(411, "send the body with a Content-Length header (chunked bodies are not read)")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit, setting)
    # Never more than limit + 1 bytes in memory, whatever the stream holds.
    raw = request.read(limit + 1)
    if len(raw) > limit:
        raise too_large(len(raw), limit, setting)
    try:
        data = boundedjson.loads(raw, max_depth=max_depth)
    except boundedjson.TooDeep as exc:
        message = f"nests arrays and objects deeper than {max_depth} levels"
        raise ApiError(
            400, f"the body is refused: {exc}", [{"field": "(body)", "message": message}]
        ) from None
    except ValueError as exc:  # not UTF-8/16/32, not JSON, an integer too long to read
        raise ApiError(
            400, f"the body is not valid JSON: {exc}", [{"field": "(body)", "message": "is not valid JSON"}]
        ) from None
    return Body(data, len(raw))
