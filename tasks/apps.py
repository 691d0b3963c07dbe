from importlib import import_module

from django.apps import AppConfig
from django.conf import settings


class TasksConfig(AppConfig):
    name = "tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Register every task family in every process (web, beat, shell), not only
        # in workers: the admin and the API send tasks by their objects, which
        # validate arguments before anything reaches the broker.
        for module in settings.CELERY_IMPORTS:
            import_module(module)
        # Workers quarantine messages they cannot run instead of dropping them or dying.
        from config.celery_app import app
        from tasks import poison

        poison.install(app)
