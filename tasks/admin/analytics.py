"""Admin for the analytics family: raw events (read-only) and the daily roll-ups."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from tasks.admin.common import reports_broker_errors
from tasks.models import DailyMetric, Event
from tasks.services import analytics


class EventNameFilter(admin.SimpleListFilter):
    """Event names taken from the roll-ups: listing DISTINCT names of the raw table would scan all of it."""

    title = "event name"
    parameter_name = "name"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        names = DailyMetric.objects.order_by("event_name").values_list("event_name", flat=True).distinct()
        return [(name, name) for name in names[:200]]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(name=value) if value else queryset


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ("timestamp", "name", "user_id")
    list_filter = (EventNameFilter,)
    date_hierarchy = "timestamp"
    ordering = ("-timestamp",)
    # Counting millions of rows for "N total" on every page view is not worth it.
    show_full_result_count = False
    fields = ("name", "user_id", "timestamp", "properties")

    # Events are a record of what happened: look, never edit (clean-up removes old ones).
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Event | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Event | None = None) -> bool:
        return False


@admin.register(DailyMetric)
class DailyMetricAdmin(admin.ModelAdmin):
    list_display = ("day", "event_name", "count", "distinct_users", "computed_at")
    list_filter = ("event_name",)
    date_hierarchy = "day"
    readonly_fields = ("day", "event_name", "count", "distinct_users", "computed_at")
    actions = ("recompute_days",)

    # Computed rows: an edit would be overwritten by the next roll-up, so recompute instead.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: DailyMetric | None = None) -> bool:
        return False

    def has_recompute_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("tasks.change_dailymetric")

    @admin.action(description="Recompute the selected days from their events", permissions=["recompute"])
    @reports_broker_errors
    def recompute_days(self, request: HttpRequest, queryset: QuerySet[DailyMetric]) -> None:
        from tasks.analytics import aggregate_daily

        days = sorted(set(queryset.values_list("day", flat=True)))
        kept = [day for day in days if analytics.is_recomputable(day)]
        for day in kept:
            aggregate_daily.delay(day=day.isoformat())
        if kept:
            shown = ", ".join(day.isoformat() for day in kept[:10]) + ("…" if len(kept) > 10 else "")
            message = f"Queued a recompute of {len(kept)} day(s): {shown}."
            self.message_user(request, message, messages.SUCCESS)
        if len(kept) < len(days):
            self.message_user(
                request,
                f"Skipped {len(days) - len(kept)} day(s) past ANALYTICS_EVENT_RETENTION_DAYS: "
                "their events may be deleted, so recomputing would erase their metrics.",
                messages.WARNING,
            )
