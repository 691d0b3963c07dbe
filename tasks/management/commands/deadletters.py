"""`python manage.py deadletters list|show|replay|purge`: the dead-letter store from a shell."""

from __future__ import annotations

import json
from argparse import ArgumentParser
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db.models import QuerySet

from jobs import services
from tasks import deadletters
from tasks.models import DeadLetter


class Command(BaseCommand):
    help = "List, show, replay or purge dead letters (tasks that failed for good)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)

        listing = sub.add_parser("list", help="one line per dead letter, newest first")
        self._add_filters(listing)
        listing.add_argument("--limit", type=int, default=50)

        show = sub.add_parser("show", help="one dead letter in full, arguments and traceback included")
        show.add_argument("id", type=int)

        replay = sub.add_parser("replay", help="send again with the same arguments")
        replay.add_argument("ids", nargs="*", type=int)
        replay.add_argument("--all", action="store_true", help="every dead letter matching the filters")
        self._add_filters(replay)

        purge = sub.add_parser("purge", help="delete dead letters")
        purge.add_argument("ids", nargs="*", type=int)
        purge.add_argument("--older-than", type=int, metavar="DAYS", help="last failed more than DAYS ago")
        purge.add_argument("--all", action="store_true", help="every dead letter matching the filters")
        self._add_filters(purge)

    def _add_filters(self, parser: ArgumentParser) -> None:
        parser.add_argument("--task", help="task name, e.g. email.send")
        parser.add_argument("--queue")
        parser.add_argument("--not-replayed", action="store_true", help="only those never replayed")

    def _selected(self, options: dict[str, Any]) -> QuerySet[DeadLetter]:
        letters = DeadLetter.objects.all()
        if options.get("ids"):
            letters = letters.filter(pk__in=options["ids"])
        if options.get("task"):
            letters = letters.filter(task_name=options["task"])
        if options.get("queue"):
            letters = letters.filter(queue=options["queue"])
        if options.get("not_replayed"):
            letters = letters.filter(replay_count=0)
        return letters

    def handle(self, *args: Any, **options: Any) -> None:
        getattr(self, f"do_{options['action']}")(options)

    def do_list(self, options: dict[str, Any]) -> None:
        letters = self._selected(options)[: options["limit"]]
        for letter in letters:
            exception = letter.exception_type.rsplit(".", 1)[-1]
            replay = f" replay:{letter.replay_status}" if letter.replay_status else ""
            self.stdout.write(
                f"{letter.pk:>6}  {letter.last_failed_at:%Y-%m-%d %H:%M:%S}  {letter.task_name:<24} "
                f"{letter.queue:<10} attempts={letter.attempts} {exception}: "
                f"{letter.exception_message[:60]}{replay}"
            )
        if not letters:
            self.stdout.write("no dead letters")

    def do_show(self, options: dict[str, Any]) -> None:
        letter = DeadLetter.objects.filter(pk=options["id"]).first()
        if letter is None:
            raise CommandError(f"dead letter {options['id']} does not exist")
        fields = {
            "id": letter.pk,
            "task": letter.task_name,
            "task_id": letter.task_id,
            "queue": letter.queue,
            "attempts": letter.attempts,
            "first_failed_at": letter.first_failed_at.isoformat(),
            "last_failed_at": letter.last_failed_at.isoformat(),
            "args": letter.args,
            "kwargs": letter.kwargs,
            "exception": f"{letter.exception_type}: {letter.exception_message}",
            "replay": {
                "count": letter.replay_count,
                "status": letter.replay_status,
                "task_id": letter.replay_task_id,
            },
        }
        self.stdout.write(json.dumps(fields, indent=2, ensure_ascii=False))
        self.stdout.write(letter.traceback)

    def _require_selection(self, options: dict[str, Any], verb: str) -> QuerySet[DeadLetter]:
        if not (options.get("ids") or options.get("all") or options.get("older_than") is not None):
            raise CommandError(f"say which dead letters to {verb}: give ids, --all or --older-than")
        return self._selected(options)

    def do_replay(self, options: dict[str, Any]) -> None:
        sent, errors = services.replay_many(self._require_selection(options, "replay"))
        self.stdout.write(f"replayed {len(sent)} dead letter(s)")
        for error in errors:
            self.stderr.write(error)
        if errors:
            raise CommandError(f"{len(errors)} dead letter(s) could not be replayed")

    def do_purge(self, options: dict[str, Any]) -> None:
        letters = self._require_selection(options, "purge")
        older = options.get("older_than")
        deleted = deadletters.purge(letters, older_than=timedelta(days=older) if older is not None else None)
        self.stdout.write(f"purged {deleted} dead letter(s)")
