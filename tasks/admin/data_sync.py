"""Admin for the data_sync family: sources (with "sync now"), runs, records and exports."""

from __future__ import annotations

import json
from functools import partial

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from tasks.admin.common import ReadOnlyAdmin, reports_broker_errors
from tasks.models import DataSource, SyncedRecord, SyncExport, SyncRun
from tasks.services.fetch import FetchError, check_url


class DataSourceForm(forms.ModelForm):
    url = forms.URLField(max_length=2000, assume_scheme="https", help_text="http(s) URL of the first page.")

    class Meta:
        model = DataSource
        fields = ("name", "kind", "url", "enabled", "id_field", "records_path", "next_path", "batch_size")

    def clean_url(self) -> str:
        """Refuses a URL the fetcher would refuse (scheme, or an address it resolves to), saying why."""
        url: str = self.cleaned_data["url"]
        try:
            check_url(url)
        except FetchError as exc:
            raise forms.ValidationError(str(exc)) from None
        return url


@admin.register(DataSource)
class DataSourceAdmin(admin.ModelAdmin):
    form = DataSourceForm
    list_display = ("name", "kind", "url", "enabled", "batch_size", "last_run")
    list_filter = ("kind", "enabled")
    search_fields = ("name", "url")
    actions = ("sync_now",)
    fieldsets = (
        (None, {"fields": ("name", "kind", "url", "enabled")}),
        ("Records", {"fields": ("id_field", "records_path", "next_path", "batch_size")}),
    )

    @admin.display(description="last run")
    def last_run(self, source: DataSource) -> str:
        run = source.runs.order_by("-started_at").first()
        return f"{run.status} at {run.started_at:%Y-%m-%d %H:%M}" if run else "never"

    @admin.action(description="Sync now", permissions=["change"])
    @reports_broker_errors
    def sync_now(self, request: HttpRequest, queryset: QuerySet[DataSource]) -> None:
        from tasks.data_sync import sync

        names = []
        for source in queryset:
            if not source.enabled:
                self.message_user(request, f"'{source.name}' is disabled: not synced.", messages.WARNING)
                continue
            # After commit, so the worker never looks for a source this request has not committed.
            transaction.on_commit(partial(sync.delay, source_id=source.pk))
            names.append(source.name)
        if names:
            self.message_user(
                request,
                f"Sync queued for {', '.join(names)}; see Sync runs for the outcome.",
                messages.SUCCESS,
            )


@admin.register(SyncRun)
class SyncRunAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "source",
        "status",
        "started_at",
        "finished_at",
        "pages",
        "fetched",
        "created",
        "updated",
        "unchanged",
        "failed",
        "page_retries",
        "short_error",
    )
    list_filter = ("status", "source")
    date_hierarchy = "started_at"
    list_select_related = ("source",)
    search_fields = ("task_id", "source__name")

    @admin.display(description="error")
    def short_error(self, run: SyncRun) -> str:
        return run.error[:100] + ("…" if len(run.error) > 100 else "")


@admin.register(SyncedRecord)
class SyncedRecordAdmin(ReadOnlyAdmin):
    list_display = ("external_id", "source", "changed_at", "created_at")
    list_filter = ("source",)
    list_select_related = ("source",)
    search_fields = ("external_id",)
    date_hierarchy = "changed_at"
    fields = ("source", "external_id", "checksum", "created_at", "changed_at", "pretty_data")
    readonly_fields = fields
    show_full_result_count = False  # a count(*) over millions of records on every page is slow

    @admin.display(description="data")
    def pretty_data(self, record: SyncedRecord) -> str:
        return format_html("<pre>{}</pre>", json.dumps(record.data, indent=2, ensure_ascii=False))


@admin.register(SyncExport)
class SyncExportAdmin(ReadOnlyAdmin):
    list_display = ("id", "source", "since", "until", "records", "path", "created_at")
    list_filter = ("source",)
    list_select_related = ("source",)
