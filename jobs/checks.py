"""`manage.py check` (and every start-up) refuses a JOBS_API_TYPES entry that is not one of our tasks."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, register


@register()
def job_types_are_tasks(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    from jobs.registry import InvalidJob, task_for

    errors = []
    for job_type in settings.JOBS_API_TYPES:
        try:
            task_for(job_type)
        except InvalidJob:
            errors.append(
                Error(
                    f"JOBS_API_TYPES lists {job_type!r}, which is not a registered task of this project",
                    hint="Use task names such as email.send; internal tasks need base=JobTask and a schema.",
                    id="jobs.E001",
                )
            )
    return errors
