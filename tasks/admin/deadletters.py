"""Admin for the dead-letter store: look, filter, search, replay."""

from __future__ import annotations

import json

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from jobs import services
from tasks.models import DeadLetter


@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "task_name",
        "queue",
        "short_exception",
        "attempts",
        "last_failed_at",
        "replay_status",
        "replay_count",
    )
    list_filter = ("task_name", "queue", "exception_type", "replay_status")
    search_fields = ("task_id", "task_name", "exception_type", "exception_message")
    date_hierarchy = "last_failed_at"
    actions = ("replay_selected",)
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "task_name",
                    "task_id",
                    "job",
                    "queue",
                    "attempts",
                    "first_failed_at",
                    "last_failed_at",
                )
            },
        ),
        ("Arguments", {"fields": ("pretty_args", "pretty_kwargs")}),
        ("Error", {"fields": ("exception_type", "exception_message", "pretty_traceback")}),
        ("Replay", {"fields": ("replay_status", "replay_count", "replayed_at", "replay_task_id")}),
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def get_readonly_fields(self, request: HttpRequest, obj: DeadLetter | None = None) -> list[str]:
        # Every field: a dead letter is a record of what happened, not something to edit.
        return [str(field) for _, options in self.fieldsets for field in options["fields"]]

    @admin.display(description="exception", ordering="exception_type")
    def short_exception(self, letter: DeadLetter) -> str:
        name = letter.exception_type.rsplit(".", 1)[-1]
        message = letter.exception_message
        return f"{name}: {message[:80]}{'…' if len(message) > 80 else ''}"

    @admin.display(description="args")
    def pretty_args(self, letter: DeadLetter) -> str:
        return format_html("<pre>{}</pre>", json.dumps(letter.args, indent=2, ensure_ascii=False))

    @admin.display(description="kwargs")
    def pretty_kwargs(self, letter: DeadLetter) -> str:
        return format_html("<pre>{}</pre>", json.dumps(letter.kwargs, indent=2, ensure_ascii=False))

    @admin.display(description="traceback")
    def pretty_traceback(self, letter: DeadLetter) -> str:
        return format_html('<pre style="white-space: pre-wrap">{}</pre>', letter.traceback)

    @admin.action(description="Replay selected dead letters (same arguments)", permissions=["change"])
    def replay_selected(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        sent, errors = services.replay_many(queryset)
        if sent:
            self.message_user(request, f"Replayed {len(sent)} dead letter(s).", messages.SUCCESS)
        for error in errors:
            self.message_user(request, error, messages.ERROR)
