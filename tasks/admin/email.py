"""Admin for the email family: the log of every message, read-only."""

from __future__ import annotations

from django.contrib import admin

from tasks.admin.common import ReadOnlyAdmin
from tasks.models import EmailLog


@admin.register(EmailLog)
class EmailLogAdmin(ReadOnlyAdmin):
    """Staff see recipients as given (they are what was sent); logs and Flower only ever mask them."""

    list_display = ("key", "recipient", "template", "campaign", "status", "attempts", "sent_at", "created_at")
    list_filter = ("status", "template", "campaign")
    search_fields = ("key", "recipient", "campaign")
    date_hierarchy = "created_at"
    show_full_result_count = False  # newsletters make this table large
    fields = (
        "key",
        "recipient",
        "template",
        "subject",
        "campaign",
        "status",
        "attempts",
        "last_error",
        "message_id",
        "created_at",
        "updated_at",
        "sent_at",
    )
    readonly_fields = fields
