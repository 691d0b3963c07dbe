"""Admin for the quarantine: messages no worker could run, as received. Look, search, delete."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest
from django.utils.html import format_html

from tasks.models import QuarantinedMessage


@admin.register(QuarantinedMessage)
class QuarantinedMessageAdmin(admin.ModelAdmin):
    list_display = ("id", "quarantined_at", "queue", "kind", "short_reason", "task_name", "size")
    list_filter = ("kind", "queue")
    search_fields = ("queue", "reason", "task_name", "task_id")
    date_hierarchy = "quarantined_at"
    fieldsets = (
        (None, {"fields": ("quarantined_at", "queue", "kind", "reason", "task_name", "task_id")}),
        (
            "Message",
            {
                "fields": (
                    "content_type",
                    "content_encoding",
                    "size",
                    "truncated",
                    "body_encoding",
                    "shown_headers",
                    "shown_body",
                )
            },
        ),
    )

    # A record of what arrived: nobody adds or edits one; staff with the delete permission
    # remove them (the list's "Delete selected" action), and default.cleanup ages them out.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object | None = None) -> bool:
        return False

    def get_readonly_fields(self, request: HttpRequest, obj: QuarantinedMessage | None = None) -> list[str]:
        return [str(field) for _, options in self.fieldsets for field in options["fields"]]

    @admin.display(description="reason", ordering="reason")
    def short_reason(self, message: QuarantinedMessage) -> str:
        return f"{message.reason[:100]}{'…' if len(message.reason) > 100 else ''}"

    @admin.display(description="headers")
    def shown_headers(self, message: QuarantinedMessage) -> str:
        return format_html('<pre style="white-space: pre-wrap">{}</pre>', message.headers or "(none)")

    @admin.display(description="body")
    def shown_body(self, message: QuarantinedMessage) -> str:
        # Escaped by format_html: a body is whatever someone wrote to the broker, HTML included.
        note = " (first 64 KiB)" if message.truncated else ""
        return format_html(
            '<p>{} bytes{}, {}</p><pre style="white-space: pre-wrap; word-break: break-all">{}</pre>',
            message.size,
            note,
            message.get_body_encoding_display(),
            message.body,
        )
