"""`python manage.py workers [--ask]`: the workers as they report themselves, or as they answer now.

Without `--ask`: every worker's presence row (monitoring.presence), present or gone, from the
database. With `--ask`: a broadcast inspect to every worker, waiting METRICS_INSPECT_TIMEOUT for
answers (monitoring.broker.inspect_workers) — for an operator at a shell; no request path does it.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db.models.functions import Now

from monitoring import broker, presence
from monitoring.models import WorkerPresence


class Command(BaseCommand):
    help = "Lists the workers as they report themselves; --ask broadcasts a question to them instead."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--ask", action="store_true", help="Ask every worker now (a broadcast).")

    def handle(self, *args: Any, ask: bool, **options: Any) -> None:
        if ask:
            view = broker.inspect_workers()
            for name, queue in view.queues.items():
                self.stdout.write(
                    f"{name}: {', '.join(queue.workers) or 'no worker'} "
                    f"(active {queue.active}, reserved {queue.reserved}, scheduled {queue.scheduled})"
                )
            for method, error in view.errors.items():
                self.stderr.write(f"{method}: {error}")
            return
        lapse = presence.lapse().total_seconds()
        rows = WorkerPresence.objects.annotate(now=Now()).order_by("node")
        for row in rows:
            ago = (row.now - row.last_seen).total_seconds()
            state = "present" if ago <= lapse else "GONE"
            self.stdout.write(
                f"{row.node} pid {row.pid}: {state}, seen {ago:.1f} s ago; "
                f"queues {', '.join(row.queues) or 'none'}; held {row.held or 'nothing'}"
            )
        if not rows:
            self.stdout.write("no worker has reported itself")
