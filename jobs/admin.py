"""Admin: API tokens (made here, shown once, revoked here), jobs, paused queues."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from jobs import queues, tree
from jobs.models import ApiToken, Job, JobDependency, QueuePause
from jobs.tokens import create_token


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("prefix", "name", "user", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "prefix", "user__username")
    actions = ["revoke"]
    fields = ("user", "name", "prefix", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("prefix", "created_at", "last_used_at")

    def get_readonly_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> Any:
        return (*self.readonly_fields, "user") if obj else (*self.readonly_fields, "revoked_at")

    def save_model(self, request: HttpRequest, obj: ApiToken, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        token, raw = create_token(obj.user, name=obj.name)
        obj.pk, obj.prefix, obj.key_hash = token.pk, token.prefix, token.key_hash
        self.message_user(
            request,
            f"The new token is {raw} — copy it now: only its hash is stored, it cannot be shown again.",
            messages.WARNING,
        )

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"{count} token(s) revoked.")


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ("id", "type", "queue", "status", "attempts", "created_at", "finished_at")
    list_filter = ("status", "queue", "type")
    search_fields = ("id", "task_id", "idempotency_key")
    date_hierarchy = "created_at"
    # Payloads can hold addresses and tokens: shown on the change page to staff, never listed.
    readonly_fields = ["job_tree", "failures", *(field.name for field in Job._meta.fields)]

    @admin.display(description="Tree")
    def job_tree(self, job: Job) -> SafeString:
        """The job above this one, the jobs below it per status, and the jobs it waits for (jobs.tree)."""
        changelist = reverse("admin:jobs_job_changelist")
        parts = []
        if job.parent_id:
            link = reverse("admin:jobs_job_change", args=[job.parent_id])
            parts.append(format_html('Spawned by <a href="{}">{}</a>.', link, job.parent_id))
        summary = tree.summaries([job.pk]).get(job.pk)
        if summary:
            counts = format_html_join(
                ", ",
                '<a href="{}?parent__id__exact={}&amp;status__exact={}">{} {}</a>',
                (
                    (changelist, job.pk, status, n, status.replace("_", " "))
                    for status, n in sorted(summary.counts.items())
                ),
            )
            parts.append(
                format_html(
                    'Children: <a href="{}?parent__id__exact={}">{}</a> ({}); {} final.',
                    changelist,
                    job.pk,
                    summary.total,
                    counts,
                    summary.final,
                )
            )
        prerequisites = list(
            JobDependency.objects.filter(job=job).values_list("prerequisite_id", "prerequisite__status")[:50]
        )
        if prerequisites:
            waited = format_html_join(
                ", ",
                '<a href="{}">{}</a> ({})',
                (
                    (reverse("admin:jobs_job_change", args=[pk]), str(pk)[:8], status)
                    for pk, status in prerequisites
                ),
            )
            rule = "all succeed" if job.run_after == Job.RunAfter.SUCCESS else "all are final"
            parts.append(format_html("Waits until {}: {}.", rule, waited))
        return format_html_join(" ", "{}", ((part,) for part in parts)) if parts else format_html("{}", "—")

    @admin.display(description="Dead letters")
    def failures(self, job: Job) -> SafeString:
        """The dead letters of this job and of the jobs below it (a newsletter's failed batches)."""
        from tasks.models import DeadLetter

        letters = list(
            DeadLetter.objects.filter(job_id__in=[job.pk, *tree.descendants(job.pk)]).values_list(
                "pk", "task_name", "exception_type"
            )[:20]
        )
        if not letters:
            return format_html("{}", "—")
        return format_html_join(
            ", ",
            '<a href="{}">{} {}</a>',
            (
                (reverse("admin:tasks_deadletter_change", args=[pk]), name, error)
                for pk, name, error in letters
            ),
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(QueuePause)
class QueuePauseAdmin(admin.ModelAdmin):
    list_display = ("queue", "paused_at", "paused_by")

    def save_model(self, request: HttpRequest, obj: QueuePause, form: Any, change: bool) -> None:
        queues.check_queue(obj.queue)
        obj.paused_by = request.user.get_username()
        super().save_model(request, obj, form, change)
        queues.broadcast_pauses([obj.queue])

    def delete_model(self, request: HttpRequest, obj: QueuePause) -> None:
        queues.resume(obj.queue)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[QueuePause]) -> None:
        for pause in list(queryset):
            queues.resume(pause.queue)
