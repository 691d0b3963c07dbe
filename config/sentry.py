"""Sentry: errors from web, workers and beat, when SENTRY_DSN is set."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured


def init_sentry(dsn: str, *, environment: str, traces_sample_rate: float) -> None:
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.django import DjangoIntegration
    from sentry_sdk.utils import BadDsn

    try:
        sentry_sdk.init(
            dsn=dsn,
            environment=environment,
            integrations=[DjangoIntegration(), CeleryIntegration(monitor_beat_tasks=True)],
            traces_sample_rate=traces_sample_rate,
            # Never attach user emails, IPs, cookies or request bodies.
            send_default_pii=False,
            max_request_body_size="never",
        )
    except BadDsn as exc:
        raise ImproperlyConfigured(f"SENTRY_DSN is not a valid Sentry DSN: {exc}") from None
