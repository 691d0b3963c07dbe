"""The `data_sync` task family (queue `data_sync`).

Tasks registered here are named `data_sync.*`, which routes them to the `data_sync`
queue (see CELERY_TASK_ROUTES). The family's work arrives with issue 3.
"""
