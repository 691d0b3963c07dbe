"""`python manage.py create_api_token USERNAME [--name NAME]`: prints a new API token, once."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs.tokens import create_token


class Command(BaseCommand):
    help = "Creates an API token for USERNAME and prints it (only its hash is stored: keep it now)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="What the token is for, e.g. the calling service.")

    def handle(self, *args: Any, username: str, name: str, **options: Any) -> None:
        User = get_user_model()
        user = User.objects.filter(**{User.USERNAME_FIELD: username}).first()
        if user is None:
            raise CommandError(f"no user {username!r}; create it first (manage.py createsuperuser)")
        if not user.is_active:
            raise CommandError(f"user {username!r} is not active; its tokens would not work")
        token, raw = create_token(user, name=name)
        self.stderr.write(f"token {token.prefix}… for {username}{' (staff)' if user.is_staff else ''}:")
        self.stdout.write(raw)
