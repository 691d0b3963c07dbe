"""The `analytics` task family (queue `analytics`).

Tasks registered here are named `analytics.*`, which routes them to the `analytics`
queue (see CELERY_TASK_ROUTES). The family's work arrives with issue 3.
"""
