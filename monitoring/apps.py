from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    name = "monitoring"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from config.celery_app import app
        from monitoring import collect

        collect.install()
        # Every worker reports its presence (by name: the step is loaded only when a worker builds
        # its consumer, after Django is set up).
        app.steps["consumer"].add("monitoring.heartbeat:WorkerHeartbeat")
        # Task events Flower turned on go off again when it stops asking (monitoring/watchers.py,
        # which also replaces Celery's `enable_events` control command to note when it came).
        app.steps["consumer"].add("monitoring.watchers:TaskEventsLapse")
