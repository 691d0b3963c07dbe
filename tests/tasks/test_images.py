"""The image pipeline as plain functions: operations, outputs, metadata, hostile files."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image
from pydantic import ValidationError

from tasks.admin.images import THUMBNAIL_OPERATIONS
from tasks.base import InvalidArguments
from tasks.images import process
from tasks.models import EmailLog, ImageAsset, ImageOutput
from tasks.services import images as service
from tests.tasks import images as make


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


def run(data: bytes, operations: list[Any], name: str = "upload.jpg") -> dict:
    asset = make.asset(data, name)
    return service.process(asset, service.operations_adapter.validate_python(operations))


def stored(output: dict) -> Image.Image:
    row = ImageOutput.objects.get(pk=output["id"])
    with row.file.open("rb") as handle:
        image = Image.open(io.BytesIO(handle.read()))
        image.load()
    return image


pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("fmt", "mode", "name"),
    [("JPEG", "RGB", "a.jpg"), ("PNG", "RGBA", "a.png"), ("WEBP", "RGB", "a.webp"), ("GIF", "P", "a.gif")],
)
def test_every_allowed_format_is_thumbnailed_in_its_own_format(fmt: str, mode: str, name: str) -> None:
    data = make.encoded(make.picture((800, 600), "RGB").convert(mode), fmt)

    result = run(data, [{"op": "thumbnail", "width": 200, "height": 200}], name)

    [output] = result["outputs"]
    image = stored(output)
    assert image.format == fmt
    assert image.size == (200, 150) == (output["width"], output["height"])
    assert output["name"].endswith("." + service.FORMAT_EXTENSIONS[fmt])


def test_operations_apply_in_order_and_each_save_stores_a_rendition() -> None:
    data = make.encoded(make.picture((800, 600)), "PNG")
    operations = [
        {"op": "crop", "left": 0, "top": 0, "right": 400, "bottom": 300},
        {"op": "save"},
        {"op": "rotate", "degrees": 90},
        {"op": "grayscale"},
        {"op": "resize", "width": 100, "height": 50},
        {"op": "convert", "format": "webp", "quality": 70},
    ]

    result = run(data, operations, "a.png")

    first, last = result["outputs"]
    assert (first["step"], first["format"], first["width"], first["height"]) == (2, "PNG", 400, 300)
    assert (last["step"], last["format"], last["width"], last["height"]) == (6, "WEBP", 100, 50)
    # The crop kept the red marker (top-left quarter) and dropped the rest of the picture.
    assert stored(first).convert("RGB").getpixel((10, 10)) == (255, 0, 0)
    gray: Any = stored(last).convert("RGB").getpixel((5, 5))
    assert len(set(gray)) == 1


def test_metadata_is_kept_unless_stripped() -> None:
    data = make.jpeg_with_exif()

    kept = stored(run(data, [{"op": "resize", "width": 64, "height": 48}])["outputs"][0])
    stripped = stored(
        run(data, [{"op": "strip_metadata"}, {"op": "resize", "width": 64, "height": 48}])["outputs"][0]
    )

    assert kept.getexif()[0x010F] == "Test Camera"
    assert kept.getexif().get_ifd(0x8825)  # the GPS position travels with it
    assert kept.info.get("icc_profile")
    assert not stripped.getexif()
    assert "icc_profile" not in stripped.info and "exif" not in stripped.info


def test_auto_orient_turns_the_pixels_and_resets_the_tag() -> None:
    data = make.jpeg_with_exif((640, 480), orientation=6)  # "rotate 90 CW to display"

    image = stored(run(data, [{"op": "auto_orient"}])["outputs"][0])

    assert image.size == (480, 640)
    assert image.getexif().get(0x0112, 1) == 1


def test_transparency_is_flattened_onto_white_for_jpeg() -> None:
    clear = Image.new("RGBA", (20, 20), (0, 0, 0, 0))

    image = stored(
        run(make.encoded(clear, "PNG"), [{"op": "convert", "format": "JPEG"}], "a.png")["outputs"][0]
    )

    assert image.format == "JPEG"
    pixel: Any = image.getpixel((10, 10))
    assert all(channel > 245 for channel in pixel)


def test_a_second_run_replaces_the_same_outputs() -> None:
    asset = make.asset(make.encoded(make.picture(), "JPEG"))
    operations = service.operations_adapter.validate_python([{"op": "thumbnail", "width": 50, "height": 50}])

    first = service.process(asset, operations)
    again = service.process(asset, operations)

    assert first == again
    output = ImageOutput.objects.get()
    assert [p.name for p in Path(output.file.path).parent.iterdir()] == [Path(str(output.file.name)).name]


def test_progress_is_reported_after_each_operation() -> None:
    asset = make.asset(make.encoded(make.picture(), "JPEG"))
    seen: list[tuple[float, str]] = []
    operations = service.operations_adapter.validate_python(
        [{"op": "grayscale"}, {"op": "rotate", "degrees": 10}]
    )

    service.process(asset, operations, on_progress=lambda percent, message: seen.append((percent, message)))

    assert [round(p) for p, _ in seen] == [33, 67, 100]
    assert seen[0][1] == "1/2: grayscale"


# Run in a fresh interpreter: a forked child of this long-lived process would inherit memory
# that malloc and Pillow hold freed but reserved, and decode into it unseen by the limit.
DECODE_WITH_LIMIT = """
import os, resource, sys
import django
django.setup()
from tasks.services import images as service
data = open(sys.argv[1], "rb").read()
with open("/proc/self/statm") as statm:
    virtual = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
limit = virtual + int(sys.argv[2]) * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    service.load_image(service.open_image(data))
    print("decoded")
except service.ImageError as exc:
    print(f"refused: {exc}")
except MemoryError:
    print("out of memory")
"""


def decode_with_memory_limit(data: bytes, headroom_mb: int, tmp_path: Path, **env: str) -> str:
    """Opens and decodes `data` in a new process whose address space may grow by `headroom_mb` only.

    Answers the child's outcome: "decoded", "refused: <message>" or "out of memory".
    """
    source = tmp_path / "image.bin"
    source.write_bytes(data)
    child = subprocess.run(
        [sys.executable, "-c", DECODE_WITH_LIMIT, str(source), str(headroom_mb)],
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", **env},
        cwd=Path(__file__).resolve().parent.parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    return child.stdout.strip()


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((10_000, 5_000), "10000x5000 (50.0 MP), over the cap of 40.0 MP (IMAGES_MAX_PIXELS)"),
        # Past Pillow's own limit (about 89 MP) Pillow refuses first; the message still names our cap.
        ((20_000, 20_000), "the image is 400.0 MP, over the cap of 40.0 MP (IMAGES_MAX_PIXELS)"),
        ((100_000, 100_000), "the image is 10000.0 MP, over the cap of 40.0 MP (IMAGES_MAX_PIXELS)"),
    ],
)
def test_a_decompression_bomb_is_refused_from_its_header_without_decoding(size, message, tmp_path) -> None:
    outcome = decode_with_memory_limit(make.png_bomb(*size), headroom_mb=30, tmp_path=tmp_path)

    assert outcome.startswith("refused: ") and message in outcome
    assert "DOS attack" not in outcome  # Pillow's own words are not passed on


def test_the_memory_limit_of_that_test_does_stop_a_real_decode(tmp_path) -> None:
    # A cap that lets the 50 MP bomb through to the decoder, in the child's settings.
    outcome = decode_with_memory_limit(
        make.png_bomb(10_000, 5_000), headroom_mb=30, tmp_path=tmp_path, IMAGES_MAX_PIXELS="60000000"
    )

    assert outcome == "out of memory"


def test_an_image_just_over_the_pixel_cap_is_refused(settings) -> None:
    settings.IMAGES_MAX_PIXELS = 640 * 480 - 1

    with pytest.raises(service.ImageError, match="IMAGES_MAX_PIXELS"):
        run(make.encoded(make.picture(), "PNG"), [{"op": "grayscale"}], "a.png")


def test_an_operation_that_would_grow_the_image_past_the_cap_is_refused(settings) -> None:
    settings.IMAGES_MAX_PIXELS = 1_000_000

    with pytest.raises(service.ImageError, match=r"operation 1 \(resize\) makes the image 2000x1000"):
        run(make.encoded(make.picture(), "PNG"), [{"op": "resize", "width": 2000, "height": 1000}], "a.png")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_truncated_file_is_refused(fmt: str) -> None:
    data = make.encoded(make.picture((800, 600)), fmt)

    with pytest.raises(service.ImageError, match="truncated or corrupt"):
        run(data[: len(data) // 2], [{"op": "grayscale"}])


@pytest.mark.parametrize(("fmt", "name"), [("BMP", "a.bmp"), ("TIFF", "a.tiff")])
def test_a_format_off_the_allow_list_is_not_parsed(fmt: str, name: str) -> None:
    with pytest.raises(service.ImageError, match=r"not an image in an allowed format \(JPEG, PNG, WEBP, GIF"):
        run(make.encoded(make.picture(), fmt), [{"op": "grayscale"}], name)


def test_a_file_over_the_size_cap_is_refused_unread(settings) -> None:
    settings.IMAGES_MAX_FILE_BYTES = 1024

    with pytest.raises(service.ImageError, match=r"over the cap of 1,024 \(IMAGES_MAX_FILE_BYTES\)"):
        run(make.encoded(make.picture(), "PNG"), [{"op": "grayscale"}], "a.png")


def test_a_crop_outside_the_image_is_a_clear_error() -> None:
    with pytest.raises(
        service.ImageError, match=r"\(crop\): the box \(0, 0, 900, 100\) is not inside the 640x480"
    ):
        run(
            make.encoded(make.picture(), "PNG"),
            [{"op": "crop", "left": 0, "top": 0, "right": 900, "bottom": 100}],
        )


def test_text_is_not_an_image() -> None:
    with pytest.raises(service.ImageError, match="not an image"):
        run(b"hello, world" * 100, [{"op": "grayscale"}], "a.jpg")


@pytest.mark.parametrize(
    ("operations", "message"),
    [
        ([], "field 'operations': List should have at least 1 item"),
        ([{"op": "blur"}], "field 'operations.0'"),
        ([{"op": "resize", "width": 0, "height": 10}], "field 'operations.0.resize.width'"),
        ([{"op": "resize", "width": 10}], "field 'operations.0.resize.height': Field required"),
        ([{"op": "convert", "format": "bmp"}], "format 'bmp' is not one of JPEG, PNG, WEBP, GIF"),
        ([{"op": "crop", "left": 5, "top": 0, "right": 5, "bottom": 9}], "right > left"),
        ([{"op": "grayscale", "strength": 2}], "Extra inputs are not permitted"),
    ],
)
def test_bad_operations_are_refused_when_sent(operations: list, message: str) -> None:
    with pytest.raises(InvalidArguments, match=message.replace("(", r"\(").replace(")", r"\)")):
        process.delay(asset_id=1, operations=operations)


def test_the_same_operations_with_defaults_spelled_out_have_the_same_key() -> None:
    short = service.operations_adapter.validate_python([{"op": "rotate", "degrees": 90}])
    spelled = service.operations_adapter.validate_python([{"op": "rotate", "degrees": 90, "expand": True}])

    assert service.operations_key(short) == service.operations_key(spelled)
    with pytest.raises(ValidationError):
        service.operations_adapter.validate_python([{"op": "rotate"}])


# --- the admin ------------------------------------------------------------------------


# What the add page's (empty) outputs inline posts along with the file.
NO_INLINE_FORMS = {"outputs-TOTAL_FORMS": "0", "outputs-INITIAL_FORMS": "0"}


def test_the_admin_takes_an_upload_and_keeps_its_name(admin_client) -> None:
    upload = SimpleUploadedFile("beach.png", make.encoded(make.picture(), "PNG"), content_type="image/png")

    response = admin_client.post("/admin/tasks/imageasset/add/", {"file": upload, **NO_INLINE_FORMS})

    assert response.status_code == 302, response.content.decode()[:2000]
    asset = ImageAsset.objects.get()
    assert asset.original_name == "beach.png"
    assert admin_client.get("/admin/tasks/imageasset/").status_code == 200
    assert admin_client.get(f"/admin/tasks/imageasset/{asset.pk}/change/").status_code == 200


@pytest.mark.parametrize(
    ("data", "name", "message"),
    [
        (
            make.png_bomb(),
            "bomb.png",
            "This image cannot be processed: the image is 10000.0 MP, over the cap of 40.0 MP",
        ),
        (
            make.encoded(make.picture(), "JPEG")[:3000],
            "cut.jpg",
            "This image cannot be processed: the image is truncated",
        ),
        (b"GIF89a not really", "fake.gif", "This image cannot be processed"),
    ],
)
def test_the_admin_refuses_an_upload_the_worker_would_refuse(admin_client, data, name, message) -> None:
    response = admin_client.post(
        "/admin/tasks/imageasset/add/", {"file": SimpleUploadedFile(name, data), **NO_INLINE_FORMS}
    )

    assert response.status_code == 200
    assert message in response.content.decode()
    assert not ImageAsset.objects.exists()


def test_the_thumbnail_action_queues_a_valid_task_after_commit(
    admin_client, django_capture_on_commit_callbacks
) -> None:
    asset = make.asset(make.encoded(make.picture(), "JPEG"))

    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(
            "/admin/tasks/imageasset/",
            {"action": "make_thumbnails", "_selected_action": [asset.pk]},
        )

    assert response.status_code == 302
    assert len(callbacks) == 1  # sent only once the request's transaction commits
    assert service.operations_adapter.validate_python(THUMBNAIL_OPERATIONS)


def test_the_email_log_admin_lists_and_is_read_only(admin_client) -> None:
    EmailLog.objects.create(key="k1", recipient="ann@example.com", template="welcome", status="sent")

    listing = admin_client.get("/admin/tasks/emaillog/?status=sent")

    assert listing.status_code == 200 and "ann@example.com" in listing.content.decode()
    assert admin_client.get("/admin/tasks/emaillog/add/").status_code == 403


def test_a_jpeg_thumbnailed_after_auto_orient_is_decoded_small_and_comes_out_right() -> None:
    data = make.jpeg_with_exif((2000, 1500), orientation=6)
    image = service.open_image(data)
    operations = service.operations_adapter.validate_python(
        [{"op": "auto_orient"}, {"op": "thumbnail", "width": 256, "height": 256}]
    )

    service.load_image(image, operations)
    assert image.size == (1000, 750)  # draft mode: decoded at half scale, still over 2 x 256

    output = stored(
        run(data, [{"op": "auto_orient"}, {"op": "thumbnail", "width": 256, "height": 256}])["outputs"][0]
    )
    assert output.size == (192, 256)
