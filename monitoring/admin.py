"""Alert rules (edited here) and alert history (read-only)."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from monitoring.models import Alert, AlertRule


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    list_display = ("kind", "enabled", "threshold", "window_minutes", "min_runs", "repeat_minutes", "firing")
    list_editable = ("enabled", "threshold", "window_minutes", "min_runs", "repeat_minutes")
    readonly_fields = ("kind",)

    @admin.display(description="firing now")
    def firing(self, rule: AlertRule) -> int:
        return rule.alerts.filter(resolved_at=None).count()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # one rule per kind, created from the settings

    def has_delete_permission(self, request: HttpRequest, obj: AlertRule | None = None) -> bool:
        return False


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = ("started_at", "rule", "subject", "value", "state", "notifications", "resolved_at")
    list_filter = ("rule", ("resolved_at", admin.EmptyFieldListFilter))
    search_fields = ("subject", "message")
    date_hierarchy = "started_at"
    readonly_fields = [field.name for field in Alert._meta.fields]

    @admin.display(description="state")
    def state(self, alert: Alert) -> str:
        return "firing" if alert.firing else "resolved"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Alert | None = None) -> bool:
        return False
