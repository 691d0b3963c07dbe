"""Pieces the family admins share."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from django.contrib import admin, messages
from django.http import HttpRequest

from tasks.base import BROKER_ERRORS

logger = logging.getLogger(__name__)

Action = TypeVar("Action", bound=Callable[..., Any])


def reports_broker_errors(action: Action) -> Action:
    """An admin action that sends tasks: a broker that is down or frozen gives the user an error
    message (after the socket timeouts, seconds), not a server error page."""

    @functools.wraps(action)
    def wrapped(model_admin: admin.ModelAdmin, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        try:
            return action(model_admin, request, *args, **kwargs)
        except BROKER_ERRORS as exc:
            logger.warning(
                "admin action %s: the broker did not answer (%s)", action.__name__, type(exc).__name__
            )
            model_admin.message_user(
                request,
                f"The broker did not answer ({type(exc).__name__}): what this action had not sent yet "
                "was not sent. Try again when the broker is back.",
                messages.ERROR,
            )
            return None

    return wrapped  # type: ignore[return-value]


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written by tasks as a record of what happened: staff look, nobody edits."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object | None = None) -> bool:
        return False
