"""The images family through a real worker and broker: outputs on disk, hostile files dead-lettered."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from PIL import Image

from jobs.models import Job
from tasks import retries
from tasks.images import process
from tasks.models import DeadLetter, ImageOutput
from tests.tasks import images as make
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"  # the in-process worker shares these settings
    return settings.MEDIA_ROOT


def test_a_pipeline_runs_on_the_images_queue_and_stores_every_rendition(celery_worker: object) -> None:
    asset = make.asset(make.jpeg_with_exif((1200, 900)), "holiday.jpg")
    operations = [
        {"op": "auto_orient"},
        {"op": "thumbnail", "width": 600, "height": 600},
        {"op": "convert", "format": "WEBP", "quality": 80},
        {"op": "save"},
        {"op": "strip_metadata"},
        {"op": "thumbnail", "width": 128, "height": 128},
        {"op": "convert", "format": "PNG"},
    ]

    result = process.delay(asset_id=asset.pk, operations=operations)

    outcome = result.get(timeout=60)
    assert [(o["step"], o["format"], o["width"], o["height"]) for o in outcome["outputs"]] == [
        (4, "WEBP", 600, 450),
        (7, "PNG", 128, 96),
    ]
    job = Job.objects.get(task_id=result.id)  # the record (no django-celery-results row besides)
    assert (job.type, job.status, job.result) == ("images.process", "succeeded", outcome)
    for row in ImageOutput.objects.filter(asset=asset):
        with Image.open(row.file.path) as image:
            assert (image.format, image.size) == (row.format, (row.width, row.height))


@pytest.mark.parametrize(
    ("data", "name", "error"),
    [
        (make.png_bomb(), "bomb.png", "decompression bomb"),
        (make.encoded(make.picture((800, 600)), "JPEG")[:5000], "cut.jpg", "truncated or corrupt"),
        (make.encoded(make.picture(), "BMP"), "old.bmp", "not an image in an allowed format"),
    ],
)
def test_a_hostile_file_goes_to_the_dead_letters_at_once(
    celery_worker: object, data: bytes, name: str, error: str
) -> None:
    asset = make.asset(data, name)

    result = process.delay(asset_id=asset.pk, operations=[{"op": "thumbnail", "width": 64, "height": 64}])

    with pytest.raises(Exception, match=error):
        result.get(timeout=30)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first())
    assert (letter.task_name, letter.queue, letter.attempts) == ("images.process", "images", 1)
    assert letter.exception_type == "tasks.errors.PermanentJobError"
    assert letter.kwargs == {
        "asset_id": asset.pk,
        "operations": [{"op": "thumbnail", "width": 64, "height": 64}],
    }
    assert not ImageOutput.objects.exists()


def test_a_missing_asset_is_a_permanent_error(celery_worker: object) -> None:
    result = process.delay(asset_id=987654, operations=[{"op": "grayscale"}])

    with pytest.raises(Exception, match="image asset 987654 does not exist"):
        result.get(timeout=30)
    assert wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first()).attempts == 1


def _storage_away(media_root: Path) -> Path:
    """The outputs' folder replaced by a plain file: every write under it fails with a real OSError
    (as a storage mount gone away does), whoever the tests run as."""
    blocker = media_root / "images" / "outputs"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    return blocker


def test_the_storage_away_for_half_a_minute_is_ridden_out(
    celery_worker: object, media_root: Path, settings
) -> None:
    # Waits at 2% of their length: images' least window (75 s) is 1.5 s here, the outage 0.6 s.
    settings.JOBS_RETRY_DELAY_SCALE = 0.02
    outage = 30 * settings.JOBS_RETRY_DELAY_SCALE
    assert retries.configured("images").window()[0] > 30
    asset = make.asset(make.encoded(make.picture((300, 200)), "PNG"), "logo.png")
    blocker = _storage_away(media_root)
    back = threading.Timer(outage, blocker.unlink)
    back.start()
    try:
        result = process.delay(asset_id=asset.pk, operations=[{"op": "thumbnail", "width": 64, "height": 64}])
        outcome = result.get(timeout=60)
    finally:
        back.cancel()

    assert [(o["width"], o["height"]) for o in outcome["outputs"]] == [(64, 43)]
    job = Job.objects.get(task_id=result.id)
    assert job.status == "succeeded" and 2 <= job.attempts <= retries.configured("images").attempts
    assert not DeadLetter.objects.exists()


def test_the_storage_away_for_good_is_a_dead_letter_after_a_few_attempts(
    celery_worker: object, media_root: Path
) -> None:
    asset = make.asset(make.encoded(make.picture((300, 200)), "PNG"), "logo.png")
    _storage_away(media_root)

    result = process.delay(asset_id=asset.pk, operations=[{"op": "grayscale"}])

    with pytest.raises(Exception, match="the output cannot be stored"):
        result.get(timeout=60)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first())
    assert letter.attempts == retries.configured("images").attempts == 5
    assert letter.exception_type == "tasks.errors.TransientJobError"
