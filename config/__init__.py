"""Project configuration. Importing the Celery app here makes `celery -A config` work."""

from config.celery_app import app as celery_app

__all__ = ("celery_app",)
