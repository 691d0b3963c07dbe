"""The `images` task family (queue `images`): Pillow pipelines on uploaded images.

`images.process` applies a list of operations to an `ImageAsset` and stores
each output through Django's storage (tasks/services/images.py does the work).
A hostile or broken file (a format off the allow-list, a decompression bomb,
a file over the size cap, a truncated file) and an impossible operation (a crop
outside the image) are permanent errors; a storage or database failure is
retried with the shared backoff.
"""

from __future__ import annotations

from typing import Any

from django.db import OperationalError
from pydantic import BaseModel, Field

from config.celery_app import app
from tasks.base import JobTask, PermanentJobError, RowId, TransientJobError
from tasks.models import ImageAsset
from tasks.progress import throttled
from tasks.services import images as service


class ProcessSchema(BaseModel):
    asset_id: RowId
    operations: list[service.Operation] = Field(min_length=1, max_length=service.MAX_OPERATIONS)


@app.task(
    bind=True,
    base=JobTask,
    name="images.process",
    schema=ProcessSchema,
    references={"asset_id": "tasks.ImageAsset"},
    autoretry_for=(TransientJobError, OperationalError),
    idempotency="outputs are keyed (asset, digest of the operations, step) and written under a name "
    "derived from that key; a second run replaces the same files and rows",
)
def process(self: JobTask, asset_id: int, operations: list[Any]) -> dict[str, Any]:
    """Applies `operations` to the asset, reporting progress after each; returns the stored outputs."""
    asset = ImageAsset.objects.filter(pk=asset_id).first()
    if asset is None:
        raise PermanentJobError(f"image asset {asset_id} does not exist")
    try:
        return service.process(asset, operations, on_progress=throttled(self.report_progress))
    except service.ImageError as exc:
        raise PermanentJobError(f"image asset {asset_id}: {exc}") from None
    except service.StorageError as exc:
        raise TransientJobError(str(exc)) from exc
