# A dead letter knows its job, so the API can show a non-staff token only its own.

import django.db.models.deletion
from django.db import migrations, models
from django.db.models import OuterRef, Subquery


def link_existing_letters(apps, schema_editor):
    """Letters written before this migration: the job whose current task id is the letter's.

    One UPDATE. A letter of an earlier run of a job retried through the API (a new task id since)
    finds no job and stays unlinked: staff still see it, non-staff tokens do not.
    """
    DeadLetter = apps.get_model("tasks", "DeadLetter")
    Job = apps.get_model("jobs", "Job")
    DeadLetter.objects.filter(job__isnull=True).update(
        job=Subquery(Job.objects.filter(task_id=OuterRef("task_id")).values("pk")[:1])
    )


class Migration(migrations.Migration):

    dependencies = [
        ("jobs", "0001_initial"),
        ("tasks", "0002_quarantinedmessage"),
    ]

    operations = [
        migrations.AddField(
            model_name="deadletter",
            name="job",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="dead_letters",
                to="jobs.job",
            ),
        ),
        migrations.RunPython(link_existing_letters, migrations.RunPython.noop),
    ]
