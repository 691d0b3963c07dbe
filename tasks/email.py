"""The `email` task family (queue `email`).

Tasks registered here are named `email.*`, which routes them to the `email`
queue (see CELERY_TASK_ROUTES). The family's work arrives with issue 3.
"""
