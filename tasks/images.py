"""The `images` task family (queue `images`).

Tasks registered here are named `images.*`, which routes them to the `images`
queue (see CELERY_TASK_ROUTES). The family's work arrives with issue 3.
"""
