from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Jobs API"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Worker side: paused queues are honoured at start-up and by a remote-control command; database
        # connections are kept from task to task (jobs.connections).
        from jobs import checks, connections, worker  # noqa: F401
