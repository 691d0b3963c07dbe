"""Alert rules, evaluated every minute by `default.check_alerts`.

Each rule looks at the system and names the subjects (tasks, queues, schedules) in trouble
right now, with a value and a sentence. A subject that starts to fire opens an Alert and
notifies once (mail to ADMINS, and a Sentry event when SENTRY_DSN is set); while it keeps
firing, it notifies again at most every `repeat_minutes`; when it stops, the alert is
resolved and a recovery notice goes out. A rule that cannot look (the broker is down for a
depth) changes nothing that round. "No worker" reads what the workers report of themselves
(monitoring.presence): a worker cut off from the broker reports no queue, a dead one nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core.mail import mail_admins
from django.db import transaction
from django.utils import timezone

from monitoring import broker, presence, stats
from monitoring.models import Alert, AlertRule
from tasks.models import DeadLetter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    subject: str
    value: float | None
    message: str


class CannotEvaluate(Exception):
    """The rule could not look this round (a dependency did not answer)."""


def default_rules() -> dict[str, dict[str, float | int]]:
    common = {
        "window_minutes": settings.ALERT_WINDOW_MINUTES,
        "min_runs": settings.ALERT_MIN_RUNS,
        "repeat_minutes": settings.ALERT_REPEAT_MINUTES,
    }
    return {
        AlertRule.Kind.FAILURE_RATE: {**common, "threshold": settings.ALERT_FAILURE_RATE_PERCENT},
        AlertRule.Kind.QUEUE_WAIT: {**common, "threshold": settings.ALERT_QUEUE_WAIT_P95_MS},
        AlertRule.Kind.BACKLOG: {**common, "threshold": settings.ALERT_BACKLOG_MESSAGES},
        AlertRule.Kind.NO_WORKER: {**common, "threshold": 0},
        AlertRule.Kind.MISSED_RUN: {**common, "threshold": 0},
        AlertRule.Kind.DEAD_LETTERS: {**common, "threshold": settings.ALERT_DEAD_LETTERS},
    }


def ensure_rules() -> list[AlertRule]:
    """Every kind of rule exists (with the settings' values the first time); returns them all."""
    for kind, values in default_rules().items():
        AlertRule.objects.get_or_create(kind=kind, defaults=values)
    return list(AlertRule.objects.all())


# --- the rules ------------------------------------------------------------------------------


def failure_rate(rule: AlertRule, now: datetime) -> list[Finding]:
    window = stats.window_stats(now - timedelta(minutes=rule.window_minutes), now, bins=1)
    found = []
    for task in window.tasks:
        rate = task.failure_rate
        if rate is not None and task.finished >= rule.min_runs and rate * 100 > rule.threshold:
            found.append(
                Finding(
                    task.name,
                    round(rate * 100, 2),
                    f"{task.name}: {task.failed} of {task.finished} runs failed in the last "
                    f"{rule.window_minutes} min ({rate * 100:.1f}% > {rule.threshold:g}%)",
                )
            )
    return found


def queue_wait(rule: AlertRule, now: datetime) -> list[Finding]:
    window = stats.window_stats(now - timedelta(minutes=rule.window_minutes), now, bins=1)
    found = []
    for queue in window.queues:
        p95 = queue.percentile("wt", 0.95)
        if p95 is not None and sum(queue.histogram("wt")) >= rule.min_runs and p95 * 1000 > rule.threshold:
            found.append(
                Finding(
                    queue.name,
                    round(p95 * 1000, 1),
                    f"queue {queue.name}: p95 wait {p95 * 1000:.0f} ms over the last "
                    f"{rule.window_minutes} min (> {rule.threshold:g} ms)",
                )
            )
    return found


def backlog(rule: AlertRule, now: datetime) -> list[Finding]:
    try:
        depths = broker.queue_depths()
    except broker.BrokerError as exc:
        raise CannotEvaluate(str(exc)) from exc
    return [
        Finding(name, depth.ready, f"queue {name}: {depth.ready} messages waiting (> {rule.threshold:g})")
        for name, depth in depths.items()
        if depth.ready > rule.threshold
    ]


def no_worker(rule: AlertRule, now: datetime) -> list[Finding]:
    # As the workers report themselves (monitoring.presence): no broadcast, no broker needed.
    return [
        Finding(name, 0, f"queue {name}: no worker is consuming it")
        for name in presence.worker_view().queues_without_workers()
        if name in settings.TASK_QUEUES
    ]


def missed_run(rule: AlertRule, now: datetime) -> list[Finding]:
    from scheduling.runs import missed_runs

    grace = timedelta(seconds=settings.SCHEDULES_MISSED_RUN_GRACE_SECONDS)
    return [
        Finding(
            run.schedule,
            None,
            f"schedule {run.schedule!r} ({run.task}): the run due "
            f"{timezone.localtime(run.due):%Y-%m-%d %H:%M %Z} was {run.status}",
        )
        for run in missed_runs(now, grace)
    ]


def dead_letters(rule: AlertRule, now: datetime) -> list[Finding]:
    since = now - timedelta(minutes=rule.window_minutes)
    new = DeadLetter.objects.filter(last_failed_at__gte=since, replayed_at__isnull=True).count()
    if new <= rule.threshold:
        return []
    waiting = DeadLetter.objects.filter(replayed_at__isnull=True).count()
    return [
        Finding(
            "dead letters",
            new,
            f"{new} new dead letters in the last {rule.window_minutes} min ({waiting} waiting in all)",
        )
    ]


RULES: dict[str, Callable[[AlertRule, datetime], list[Finding]]] = {
    AlertRule.Kind.FAILURE_RATE: failure_rate,
    AlertRule.Kind.QUEUE_WAIT: queue_wait,
    AlertRule.Kind.BACKLOG: backlog,
    AlertRule.Kind.NO_WORKER: no_worker,
    AlertRule.Kind.MISSED_RUN: missed_run,
    AlertRule.Kind.DEAD_LETTERS: dead_letters,
}


# --- firing, repeating, recovering ------------------------------------------------------------


@dataclass
class Evaluation:
    fired: list[str]
    repeated: list[str]
    resolved: list[str]
    skipped: list[str]


def evaluate(now: datetime | None = None, *, kinds: Iterable[str] | None = None) -> Evaluation:
    """Evaluates every rule (or those of `kinds`) as of `now`."""
    now = now or timezone.now()
    result = Evaluation([], [], [], [])
    wanted = set(RULES if kinds is None else kinds)
    for rule in ensure_rules():
        if rule.kind not in wanted:
            continue
        try:
            findings = {f.subject: f for f in RULES[rule.kind](rule, now)} if rule.enabled else {}
        except CannotEvaluate as exc:
            logger.warning("alert rule %s could not be evaluated: %s", rule.kind, exc)
            result.skipped.append(rule.kind)
            continue
        with transaction.atomic():
            apply_findings(rule, findings, now, result)
    return result


def apply_findings(rule: AlertRule, findings: dict[str, Finding], now: datetime, result: Evaluation) -> None:
    current = Alert.objects.select_for_update().filter(rule=rule, resolved_at=None)
    open_alerts = {alert.subject: alert for alert in current}
    for subject, finding in findings.items():
        alert = open_alerts.get(subject)
        if alert is None:
            Alert.objects.create(
                rule=rule,
                subject=subject,
                value=finding.value,
                message=finding.message,
                started_at=now,
                last_notified_at=now,
            )
            notify(f"FIRING: {finding.message}", finding.message, firing=True)
            result.fired.append(f"{rule.kind}:{subject}")
            continue
        alert.value, alert.message = finding.value, finding.message
        if now - alert.last_notified_at >= timedelta(minutes=rule.repeat_minutes):
            alert.last_notified_at = now
            alert.notifications += 1
            since = timezone.localtime(alert.started_at)
            notify(
                f"STILL FIRING: {finding.message}",
                f"{finding.message}\n\nFiring since {since:%Y-%m-%d %H:%M %Z}.",
                firing=True,
            )
            result.repeated.append(f"{rule.kind}:{subject}")
        alert.save()
    for subject, alert in open_alerts.items():
        if subject in findings:
            continue
        alert.resolved_at = now
        alert.save(update_fields=["resolved_at"])
        minutes = (now - alert.started_at).total_seconds() / 60
        notify(
            f"RECOVERED: {rule}: {subject}",
            f"Recovered after {minutes:.0f} min. It was: {alert.message}",
            firing=False,
        )
        result.resolved.append(f"{rule.kind}:{subject}")


def notify(subject: str, body: str, *, firing: bool) -> None:
    """Mail to ADMINS and, with a DSN, a Sentry event. A notice that cannot be sent is logged."""
    try:
        mail_admins(subject[:180], body + "\n\nSee Task metrics (/admin/metrics/) in the jobs admin.\n")
    except Exception as exc:  # the exception text could name recipients: log its type only
        logger.error("alert: could not mail the admins (%s): %s", type(exc).__name__, subject)
    if settings.SENTRY_DSN:
        import sentry_sdk

        sentry_sdk.capture_message(subject, level="error" if firing else "info")
