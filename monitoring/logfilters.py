"""Logging filters, importable while settings load (no models here)."""

from __future__ import annotations

import logging


class DropNotReadyResponses(logging.Filter):
    """Keeps `/readyz` answering 503 out of the `django.request` error log (and so out of Sentry).

    Django logs every 5xx response at ERROR; a probe that polls a not-ready system every few
    seconds would flood both. What failed is logged by the checks themselves, at WARNING.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        request = getattr(record, "request", None)
        return not (getattr(record, "status_code", None) == 503 and getattr(request, "path", "") == "/readyz")
