"""Schedules: defaults in code, synced into django-celery-beat."""
