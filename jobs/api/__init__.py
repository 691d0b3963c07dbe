"""The REST API under /api/ (django-ninja): jobs, queues, dead letters, and its OpenAPI document.

Errors are JSON `{"detail": ..., "errors": [...]}` with the status codes
docs/api.md lists; validation errors are 400 and name the field (ninja's own 422 is
mapped here).
"""

from __future__ import annotations

import logging
from typing import Any

from django.http import HttpRequest, HttpResponse
from kombu.exceptions import OperationalError as KombuOperationalError
from limits.errors import StorageError
from ninja import NinjaAPI
from ninja.errors import ValidationError as NinjaValidationError
from ninja.parser import Parser
from redis.exceptions import RedisError

from jobs.api.auth import ApiTokenAuth
from jobs.api.common import ApiError, error_response
from jobs.publish import BrokerUnavailable
from jobs.ratelimit import LimiterUnavailable
from jobs.registry import request_body_schema

logger = logging.getLogger(__name__)

API_DESCRIPTION = """Hand work to the jobs platform and follow it to the end.

Every operation needs `Authorization: Bearer <token>` (tokens are made in the admin or with
`python manage.py create_api_token USERNAME`). Operations whose security is `StaffTokenAuth`
need the token of a staff user. Errors are JSON: `{"detail": "...", "errors": [{"field", "message"}]}`.
"""


class JobsAPI(NinjaAPI):
    def get_openapi_schema(self, *args: Any, **kwargs: Any) -> Any:
        schema = super().get_openapi_schema(*args, **kwargs)
        body = dict(request_body_schema())
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(body.pop("$defs", {}))
        components["JobRequest"] = body
        return schema


class SingleValuedQuery(Parser):
    """A query parameter that is not a list is given once: `?type=a&type=b` is a 400, not "the last one"."""

    def parse_querydict(self, data: Any, list_fields: list[str], request: HttpRequest) -> dict[str, Any]:
        repeated = [key for key in data if key not in list_fields and len(data.getlist(key)) > 1]
        if repeated:
            raise NinjaValidationError(
                [{"loc": ("query", key), "msg": "is given more than once"} for key in repeated]
            )
        return super().parse_querydict(data, list_fields, request)


def _schema_auth(view: Any) -> Any:
    """The OpenAPI document is served to API token holders and logged-in staff."""

    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        user = getattr(request, "user", None)
        if (user is not None and user.is_authenticated and user.is_staff) or ApiTokenAuth()(request):
            return view(request, *args, **kwargs)
        return HttpResponse('{"detail": "Unauthorized"}', status=401, content_type="application/json")

    return wrapped


api = JobsAPI(
    title="Jobs API",
    version="1.0.0",
    description=API_DESCRIPTION,
    auth=ApiTokenAuth(),
    urls_namespace="api",
    openapi_url="/schema",
    docs_url="/docs",
    docs_decorator=_schema_auth,
    parser=SingleValuedQuery(),
)


@api.exception_handler(NinjaValidationError)
def _bad_request(request: HttpRequest, exc: NinjaValidationError) -> HttpResponse:
    errors = []
    for item in exc.errors:
        loc = [str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path", "header")]
        errors.append({"field": ".".join(loc) or "(request)", "message": str(item.get("msg", "is invalid"))})
    detail = "; ".join(f"field '{error['field']}': {error['message']}" for error in errors)
    return api.create_response(request, {"detail": detail, "errors": errors}, status=400)


@api.exception_handler(ApiError)
def _api_error(request: HttpRequest, exc: ApiError) -> HttpResponse:
    return error_response(request, exc)


# What the broker (kombu), Redis (redis-py, the rate limiter) or a socket raise when they are
# down or frozen. Each endpoint says what it kept; this is the net under all of them: a 503
# the client can retry, never a 500.
UNAVAILABLE: tuple[type[Exception], ...] = (
    KombuOperationalError,
    RedisError,
    StorageError,
    BrokerUnavailable,
    LimiterUnavailable,
    ConnectionError,
    TimeoutError,
)


def _unavailable(request: HttpRequest, exc: Any) -> HttpResponse:
    # The type only: connection errors name the server's address.
    logger.warning(
        "api: %s %s: the broker or Redis did not answer (%s)",
        request.method,
        request.path,
        type(exc).__name__,
    )
    return error_response(
        request,
        ApiError(
            503,
            f"a service the API needs (the broker or Redis) did not answer ({type(exc).__name__}); try again",
            Retry_After="5",
        ),
    )


for _error in UNAVAILABLE:
    api.add_exception_handler(_error, _unavailable)


from jobs.api import dead_letters, jobs, queues  # noqa: E402  (routers use `api`)

api.add_router("/jobs", jobs.router)
api.add_router("/queues", queues.router)
api.add_router("/dead-letters", dead_letters.router)
