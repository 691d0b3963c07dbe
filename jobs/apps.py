from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Jobs API"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Worker side: paused queues are honoured at start-up and by a remote-control command.
        from jobs import checks, worker  # noqa: F401
        # Worker side: database connections kept from task to task, checked at each start.
        from jobs import connections  # noqa: F401
