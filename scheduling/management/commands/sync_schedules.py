"""`python manage.py sync_schedules [--reset NAME ...]`: the default schedules into the database."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from scheduling import defaults


class Command(BaseCommand):
    help = "Creates or updates the default schedules (scheduling/defaults.py); never overwrites admin edits."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--reset",
            action="append",
            default=[],
            metavar="NAME",
            help="put this default schedule back to the code's definition, even if edited or deleted",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        known = {schedule.name for schedule in defaults.DEFAULT_SCHEDULES}
        unknown = sorted(set(options["reset"]) - known)
        if unknown:
            raise CommandError(
                f"no default schedule named {', '.join(map(repr, unknown))}; known: {sorted(known)}"
            )
        for line in defaults.sync(reset=frozenset(options["reset"])):
            self.stdout.write(line)
