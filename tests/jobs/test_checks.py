"""Start-up checks of the jobs app."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError


def test_it_refuses_a_job_type_that_is_not_a_task_of_ours(settings) -> None:
    settings.JOBS_API_TYPES = ["email.send", "email.sned"]

    with pytest.raises(SystemCheckError, match=r"jobs.E001.*'email.sned'"):
        call_command("check")


def test_the_default_job_types_pass_the_check() -> None:
    call_command("check")
