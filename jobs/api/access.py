"""Who sees what through the API: the rules of the access matrix (docs/security.md), in one place.

- A staff token sees every job and every dead letter, as stored.
- Any other token sees the jobs sent with its user's tokens and the dead letters of those jobs;
  anything else answers 404, as if it did not exist (a 403 would say that it does).
- What a non-staff token is shown names no place on the server: absolute file paths in error
  messages and results are cut to their file name, a traceback to its final exception line, and
  worker host names are replaced by numbered labels.
"""

from __future__ import annotations

import re
from typing import Any

from django.db.models import QuerySet

from jobs.models import ApiToken, Job
from tasks.models import DeadLetter

# An absolute POSIX path of two or more parts (/srv/app/tasks/images.py), not inside a URL
# (https://host/a/b), a relative path (images/outputs/1.png), a date (2026/11/23) or a path of this
# API (/api/jobs/<id>/children, where a job's result says its failures are).
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~\\-])(?!/api/)(?:/[^\s/'\"()<>,;:=]+)+/(?P<name>[^\s/'\"()<>,;:=]*)")
HIDDEN_DIRECTORY = "\N{HORIZONTAL ELLIPSIS}"


def is_staff(token: ApiToken) -> bool:
    return bool(token.user.is_staff)


def visible_jobs(token: ApiToken) -> QuerySet[Job]:
    """Staff see every job; others the jobs sent with their user's tokens."""
    jobs = Job.objects.all()
    return jobs if is_staff(token) else jobs.filter(token__user=token.user_id)


def visible_dead_letters(token: ApiToken) -> QuerySet[DeadLetter]:
    """Staff see every dead letter; others those of the jobs sent with their user's tokens.

    A letter no job of theirs claims (beat's tasks, internal tasks, letters written before letters
    knew their job) is staff's only.
    """
    letters = DeadLetter.objects.all()
    return letters if is_staff(token) else letters.filter(job__token__user=token.user_id)


def redact_paths(text: str) -> str:
    """`/srv/app/tasks/images.py` becomes `…/images.py`: the file, not where the server keeps it."""
    return ABSOLUTE_PATH.sub(lambda match: f"{HIDDEN_DIRECTORY}/{match['name']}", text)


def redact_in(value: Any) -> Any:
    """`redact_paths` over every string of a JSON value (a job's result)."""
    if isinstance(value, str):
        return redact_paths(value)
    if isinstance(value, list):
        return [redact_in(item) for item in value]
    if isinstance(value, dict):
        return {key: redact_in(item) for key, item in value.items()}
    return value


def final_exception_line(exception_type: str, exception_message: str) -> str:
    """What a traceback ends with (`tasks.errors.PermanentJobError: ...`), without file paths."""
    name = exception_type.removeprefix("builtins.")
    message = redact_paths(exception_message)
    return f"{name}: {message}" if message else name
