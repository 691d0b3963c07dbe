"""The periodic-task admin: cron in words, next runs with DST marks, last run, Run now.

It replaces django-celery-beat's PeriodicTask and CrontabSchedule admins. A task's
cron schedule is typed on the task's own form (expression and time zone), which
finds or creates the matching CrontabSchedule row: editing one task never changes
another that happened to share a crontab row. Every write here (forms and bulk
actions) marks django-celery-beat's change tracker, so beat picks it up within
CELERY_BEAT_MAX_LOOP_INTERVAL seconds.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import available_timezones

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.validators import MaxValueValidator
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django_celery_beat.admin import PeriodicTaskAdmin, PeriodicTaskForm
from django_celery_beat.models import CrontabSchedule, PeriodicTask, PeriodicTasks
from django_celery_results.models import TaskResult
from kombu.utils.json import loads

from config.celery_app import app, import_task_modules
from jobs.models import Job
from scheduling import beat
from scheduling.cron import FIELDS, Cron, CronError, Occurrence, parse_field
from scheduling.defaults import crontab_for
from scheduling.models import ScheduledRun, ScheduleOptions
from tasks.admin.common import ReadOnlyAdmin, reports_broker_errors
from tasks.backends import JOB_STATES
from tasks.base import JobTask, PermanentJobError
from tasks.services import boundedjson

TIME_ZONES = sorted(available_timezones())


def cron_of(task: PeriodicTask) -> Cron | None:
    return None if task.crontab is None else Cron.of(task.crontab)


def upcoming_runs(task: PeriodicTask, count: int = 5, now: datetime | None = None) -> list[Occurrence]:
    """The next `count` runs as beat will compute them (same code), each with its DST note."""
    now = now or beat.current_time()
    cron = cron_of(task)
    if cron is not None:
        return cron.upcoming(now, count)
    if task.interval is not None:
        slots = beat.SlotSchedule(timedelta(**{task.interval.period: task.interval.every}))
        first = slots.occurrence(now)
        zone = timezone.get_current_timezone()
        return [
            Occurrence(at, at.astimezone(zone), "")
            for at in (first + timedelta(seconds=slots.every * step) for step in range(1, count + 1))
        ]
    return []


def format_occurrence(occurrence: Occurrence) -> str:
    return f"{occurrence.local:%a %Y-%m-%d %H:%M %Z} ({occurrence.at:%H:%M} UTC)"


class ScheduleForm(PeriodicTaskForm):
    cron_expression = forms.CharField(
        required=False,
        max_length=200,
        label="Cron expression",
        help_text="minute hour day-of-month month day-of-week, e.g. <code>30 1 * * *</code>; "
        "Sunday is 0; day of month and day of week must both match. "
        "Leave empty for an interval, solar or clocked schedule.",
    )
    cron_timezone = forms.ChoiceField(
        required=False,
        label="Time zone",
        choices=[(zone, zone) for zone in TIME_ZONES],
        help_text="The wall clock the expression is read on (DST policy: see docs/schedules.md).",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._show_registered_task()
        # django-celery-beat says 0-255 and "Redis reversed": here it is 0-9, 9 first, on both brokers.
        priority = self.fields.get("priority")
        if isinstance(priority, forms.IntegerField):
            priority.validators.append(MaxValueValidator(9))
            priority.widget.attrs["max"] = 9
            priority.help_text = (
                "0-9, higher runs sooner, on Redis and RabbitMQ alike. Empty: 5, the middle, "
                "as every task sent without one."
            )
        crontab = self.instance.crontab if self.instance.pk else None
        if crontab is not None:
            self.initial.setdefault(
                "cron_expression",
                " ".join(
                    (
                        crontab.minute,
                        crontab.hour,
                        crontab.day_of_month,
                        crontab.month_of_year,
                        crontab.day_of_week,
                    )
                ),
            )
            self.initial.setdefault("cron_timezone", str(crontab.timezone))
        else:
            self.initial.setdefault("cron_timezone", settings.TIME_ZONE)

    def _clean_json(self, field: str) -> Any:
        # PeriodicTaskForm's own check (for args and kwargs) parsed without a depth bound: text
        # nested a thousand deep was a RecursionError, a 500. Headers were not checked at all, and
        # beat reads them as an object.
        value = self.cleaned_data[field]
        try:
            parsed = boundedjson.loads(value, max_depth=boundedjson.MAX_DEPTH)
        except ValueError as exc:
            raise forms.ValidationError(f"Unable to parse JSON: {exc}") from None
        if field == "headers" and not isinstance(parsed, dict):
            raise forms.ValidationError("must be a JSON object, e.g. {}")
        return value

    def clean_headers(self) -> Any:
        return self._clean_json("headers")

    def _show_registered_task(self) -> None:
        """ "Task (registered)" lists our tasks and shows the one this schedule runs.

        django-celery-beat's widget never selects the saved task (the field stayed blank on every
        change page), and builds its list with Celery's loader, whose Django fix-up runs the
        system checks in the web process. Our task modules are imported directly instead.
        """
        import_task_modules()
        names = sorted(name for name in app.tasks if not name.startswith("celery."))
        self.fields["regtask"].widget = forms.Select(choices=[("", "---------"), *((n, n) for n in names)])
        if self.instance.pk and self.instance.task in names:
            self.initial.setdefault("regtask", self.instance.task)

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        self._clean_schedule(data)
        self._clean_arguments(data)
        return data

    def _clean_schedule(self, data: dict[str, Any]) -> None:
        expression = (data.get("cron_expression") or "").strip()
        if not expression:
            self.instance.crontab = None
            return
        others = [name for name in ("interval", "solar", "clocked") if data.get(name)]
        if others:
            self.add_error(
                "cron_expression", f"a task has one schedule: clear the cron expression or the {others[0]}"
            )
            return
        zone = data.get("cron_timezone") or settings.TIME_ZONE
        try:
            cron = Cron.parse(expression, zone)
        except CronError as error:
            self.add_error("cron_timezone" if error.field == "timezone" else "cron_expression", str(error))
            return
        if cron.next_after(beat.current_time()) is None:
            self.add_error(
                "cron_expression", f"{expression!r} never runs (no such date in the next 29 years)"
            )
            return
        self.instance.crontab = crontab_for(cron.expression, zone)

    def _clean_arguments(self, data: dict[str, Any]) -> None:
        """Arguments are checked against the task's schema here, not when beat sends them at 2 a.m."""
        task = app.tasks.get(data.get("task") or "")
        if not isinstance(task, JobTask) or self.errors.keys() & {"args", "kwargs"}:
            return
        try:
            args, kwargs = loads(data.get("args") or "[]"), loads(data.get("kwargs") or "{}")
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise PermanentJobError(
                    "positional arguments must be a JSON list, keyword arguments a JSON object"
                )
            arguments = task.validate_arguments(args, kwargs)
            missing = task.missing_references(arguments)
            if missing:
                raise PermanentJobError("; ".join(f"field '{f}': {why}" for f, why in missing.items()))
        except (PermanentJobError, ValueError) as error:
            self.add_error("kwargs", str(error))


class ScheduleOptionsInline(admin.StackedInline):
    model = ScheduleOptions
    can_delete = False
    verbose_name_plural = "missed runs"


admin.site.unregister(PeriodicTask)


@admin.register(PeriodicTask)
class ScheduleAdmin(PeriodicTaskAdmin):
    form = ScheduleForm
    change_form_template = None
    date_hierarchy = None
    inlines = [ScheduleOptionsInline]
    list_display = ("name", "task", "cron", "in_words", "time_zone", "next_run", "last_run", "enabled")
    list_filter = ("enabled", "task")
    actions = ("run_now", "enable_tasks", "disable_tasks", "toggle_tasks")
    fieldsets = (
        (None, {"fields": ("name", "regtask", "task", "enabled", "description")}),
        (
            "Schedule",
            {
                "fields": (
                    "cron_expression",
                    "cron_timezone",
                    "in_words",
                    "next_runs",
                    "interval",
                    "solar",
                    "clocked",
                    "start_time",
                    "one_off",
                )
            },
        ),
        ("Runs", {"fields": ("last_run_at", "recent_runs")}),
        ("Arguments", {"fields": ("args", "kwargs")}),
        (
            "Execution options",
            {
                "fields": ("expires", "expire_seconds", "queue", "priority", "headers"),
                "classes": ("collapse",),
            },
        ),
    )
    readonly_fields = ("in_words", "next_runs", "recent_runs", "last_run_at")

    class Media:
        # Django indents every list in an aligned form by 160 px; the run lists are read-only text.
        css = {"all": ("scheduling/admin.css",)}

    def get_queryset(self, request: HttpRequest) -> QuerySet[PeriodicTask]:
        latest = ScheduledRun.objects.filter(schedule_name=OuterRef("name")).order_by("-dispatched_at")
        result = TaskResult.objects.filter(task_id=OuterRef("last_task_id"))
        # A job's run is recorded in its row alone (tasks.backends); older runs and Celery's own
        # tasks in django-celery-results' table.
        job = Job.objects.filter(task_id=OuterRef("last_task_id"))
        return (
            super()
            .get_queryset(request)
            .select_related("schedule_options")
            .annotate(
                last_dispatched_at=Subquery(latest.values("dispatched_at")[:1]),
                last_run_status=Subquery(latest.values("status")[:1]),
                last_task_id=Subquery(latest.values("task_id")[:1]),
            )
            .annotate(
                last_result_status=Subquery(result.values("status")[:1]),
                last_result_started=Subquery(result.values("date_created")[:1]),
                last_result_done=Subquery(result.values("date_done")[:1]),
                last_job_status=Subquery(job.values("status")[:1]),
                last_job_started=Subquery(job.values("started_at")[:1]),
                last_job_done=Subquery(job.values("finished_at")[:1]),
            )
        )

    # --- columns ------------------------------------------------------------------

    @admin.display(description="cron")
    def cron(self, task: PeriodicTask) -> str:
        cron = cron_of(task)
        if cron is not None:
            return cron.expression
        return str(task.interval or task.solar or task.clocked or "-")

    @admin.display(description="in words")
    def in_words(self, task: PeriodicTask) -> str:
        cron = cron_of(task)
        return cron.describe() if cron is not None else "-"

    @admin.display(description="time zone")
    def time_zone(self, task: PeriodicTask) -> str:
        return str(task.crontab.timezone) if task.crontab else "UTC"

    @admin.display(description="next run")
    def next_run(self, task: PeriodicTask) -> str:
        if not task.enabled:
            return "- (disabled)"
        runs = upcoming_runs(task, 1)
        if not runs:
            return "-"
        return format_occurrence(runs[0]) + (f" ⚠ {runs[0].dst}" if runs[0].dst else "")

    @admin.display(description="last run")
    def last_run(self, task: PeriodicTask) -> str:
        when = getattr(task, "last_dispatched_at", None)
        if when is None:
            return "never"
        status = getattr(task, "last_result_status", None)
        started, done = getattr(task, "last_result_started", None), getattr(task, "last_result_done", None)
        if status is None and getattr(task, "last_job_status", None):
            status = JOB_STATES[task.last_job_status]
            started, done = task.last_job_started, task.last_job_done
        return f"{timezone.localtime(when):%Y-%m-%d %H:%M:%S %Z} · " + outcome(
            getattr(task, "last_run_status", ""), status, started, done
        )

    # --- detail page --------------------------------------------------------------

    @admin.display(description="next 5 runs")
    def next_runs(self, task: PeriodicTask) -> str:
        if task.pk is None:
            return "- (save to see them)"
        runs = upcoming_runs(task, 5)
        if not runs:
            return "-"
        rows = format_html_join(
            "",
            "<li>{}{}</li>",
            (
                (
                    format_occurrence(run),
                    format_html(' <strong class="dst">DST: {}</strong>', run.dst) if run.dst else "",
                )
                for run in runs
            ),
        )
        note = (
            ""
            if task.enabled
            else format_html("<p><strong>{}</strong></p>", "Disabled: these runs will not happen.")
        )
        return format_html('<ul class="next-runs">{}</ul>{}', rows, note)

    @admin.display(description="recent runs")
    def recent_runs(self, task: PeriodicTask) -> str:
        runs = list(ScheduledRun.objects.filter(schedule_name=task.name)[:10]) if task.pk else []
        if not runs:
            return "none yet"
        task_ids = [run.task_id for run in runs]
        results = {
            r.task_id: (r.status, getattr(r, "date_created", None), r.date_done)
            for r in TaskResult.objects.filter(task_id__in=task_ids)
        }
        # A job's run is recorded in its row alone (tasks.backends).
        for task_id, status, started, done in Job.objects.filter(task_id__in=task_ids).values_list(
            "task_id", "status", "started_at", "finished_at"
        ):
            results.setdefault(task_id, (JOB_STATES[status], started, done))
        rows = []
        for run in runs:
            status, started, done = results.get(run.task_id, (None, None, None))
            shown = outcome(run.status, status, started, done)
            late = f"{run.lag_seconds:.2f} s late" if run.kind == ScheduledRun.Kind.SCHEDULED else "run now"
            rows.append(
                (f"{timezone.localtime(run.dispatched_at):%Y-%m-%d %H:%M:%S %Z}", late, shown, run.detail)
            )
        return format_html(
            '<ul class="recent-runs">{}</ul>', format_html_join("", "<li>{} ({}): {} {}</li>", rows)
        )

    # --- actions ------------------------------------------------------------------

    @admin.action(description="Run now")
    @reports_broker_errors
    def run_now(self, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> None:
        sent = []
        for task in queryset.select_related("crontab", "interval", "solar", "clocked"):
            try:
                run = beat.run_now(app, task)
            except PermanentJobError as error:
                self.message_user(request, f"{task.name}: not sent: {error}", level=messages.ERROR)
            else:
                sent.append(f"{task.name} (task id {run.task_id})")
        if sent:
            self.message_user(request, "Sent now: " + ", ".join(sent))

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        PeriodicTasks.update_changed()  # an inline-only change (missed-run policy) must reach beat too

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> None:
        super().delete_queryset(request, queryset)
        PeriodicTasks.update_changed()


def outcome(status: str, result: str | None, started: datetime | None, done: datetime | None) -> str:
    if status != ScheduledRun.Status.DISPATCHED:
        return str(ScheduledRun.Status(status).label) if status else "-"
    if result is None:
        return "sent, not started yet"
    if result in {"SUCCESS", "FAILURE"} and started and done:
        return f"{result} in {(done - started).total_seconds():.2f} s"
    return str(result)


class CrontabForm(forms.ModelForm):
    """Each field checked on its own, so the error names the field and its valid range."""

    class Meta:
        model = CrontabSchedule
        fields = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week", "timezone")


def _field_cleaner(name: str) -> Any:
    def clean(self: CrontabForm) -> str:
        value = str(self.cleaned_data.get(name, "")).strip()
        try:
            parse_field(name, value)
        except CronError as error:
            raise forms.ValidationError(str(error)) from None
        return value

    return clean


for _name, *_ in FIELDS:
    setattr(CrontabForm, f"clean_{_name}", _field_cleaner(_name))


admin.site.unregister(CrontabSchedule)


@admin.register(CrontabSchedule)
class CrontabAdmin(admin.ModelAdmin):
    form = CrontabForm
    list_display = ("__str__", "in_words", "timezone")

    @admin.display(description="in words")
    def in_words(self, crontab: CrontabSchedule) -> str:
        try:
            return Cron.of(crontab).describe()
        except CronError as error:
            return f"invalid: {error}"


@admin.register(ScheduledRun)
class ScheduledRunAdmin(ReadOnlyAdmin):
    list_display = ("schedule_name", "task", "kind", "occurrence", "dispatched_at", "lag", "status", "beat")
    list_filter = ("kind", "status", "task")
    search_fields = ("schedule_name", "task", "task_id")
    date_hierarchy = "occurrence"

    @admin.display(description="late by")
    def lag(self, run: ScheduledRun) -> str:
        return f"{run.lag_seconds:.3f} s" if run.kind == ScheduledRun.Kind.SCHEDULED else "-"
