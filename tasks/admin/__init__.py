"""Admin for the task families, one module each, plus the dead-letter store."""

from tasks.admin import analytics, data_sync, deadletters, email, images, quarantine  # noqa: F401
