"""Image pipelines with Pillow: open a stored image safely, apply operations, store the outputs.

An operation list is applied in order to one image; every `save` operation
stores the image as it is at that point (so one list can make several
renditions), and the image as it is at the end is stored too unless the list
ends with a `save`. Outputs are keyed by the asset, a digest of the operation
list and the step, and written under a name derived from them: running the same
list twice leaves the same rows and files.

Hostile files are refused before they cost memory: only formats on the
allow-list are parsed at all, the file size is checked before reading, the
pixel count from the header before decoding (far below Pillow's own bomb
limit, and as an error rather than Pillow's warning), and a truncated or
corrupt file fails to decode instead of being padded with grey.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from django.conf import settings
from django.core.files.base import ContentFile
from django.db import transaction
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from tasks.models import ImageAsset, ImageOutput

MAX_SIDE = 10_000  # pixels on either side of a requested size
MAX_COORDINATE = 2**31 - 1  # Pillow keeps coordinates in C ints
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "AVIF": "avif"}
LOSSY = {"JPEG", "WEBP", "AVIF"}


class ImageError(Exception):
    """The image or the operations can never be processed: a permanent error."""


class StorageError(Exception):
    """The storage failed to read or write: may work later."""


# --- Operations ---------------------------------------------------------------------


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resize(_Op):
    """Exactly `width` x `height` (the aspect ratio may change)."""

    op: Literal["resize"]
    width: int = Field(ge=1, le=MAX_SIDE)
    height: int = Field(ge=1, le=MAX_SIDE)


class Thumbnail(_Op):
    """At most `width` x `height`, keeping the aspect ratio; never enlarges."""

    op: Literal["thumbnail"]
    width: int = Field(ge=1, le=MAX_SIDE)
    height: int = Field(ge=1, le=MAX_SIDE)


class Crop(_Op):
    """The box from (`left`, `top`) to (`right`, `bottom`), which must lie inside the image."""

    op: Literal["crop"]
    left: int = Field(ge=0, le=MAX_COORDINATE)
    top: int = Field(ge=0, le=MAX_COORDINATE)
    right: int = Field(ge=1, le=MAX_COORDINATE)
    bottom: int = Field(ge=1, le=MAX_COORDINATE)

    @model_validator(mode="after")
    def _box(self) -> Crop:
        if self.right <= self.left or self.bottom <= self.top:
            raise ValueError("the box must have right > left and bottom > top")
        return self


class Rotate(_Op):
    """Counter-clockwise by `degrees`; `expand` grows the canvas to keep the corners."""

    op: Literal["rotate"]
    degrees: float = Field(ge=-360, le=360)
    expand: bool = True


class Grayscale(_Op):
    op: Literal["grayscale"]


class AutoOrient(_Op):
    """Turns the pixels the way the EXIF orientation says, and drops that tag."""

    op: Literal["auto_orient"]


def _any_case(names: Iterable[str]) -> str:
    """A JSON Schema pattern matching any of `names` in any letter case (`png`, `PNG`, `Png`)."""

    def any_case(name: str) -> str:
        return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in name)

    return "^(?:" + "|".join(any_case(name) for name in names) + ")$"


class Convert(_Op):
    """Outputs stored from here on are in `format` (and `quality` for lossy formats)."""

    op: Literal["convert"]
    # The document says which formats (IMAGES_ALLOWED_FORMATS at start-up); the validator decides.
    format: str = Field(json_schema_extra={"pattern": _any_case(settings.IMAGES_ALLOWED_FORMATS)})
    quality: int | None = Field(default=None, ge=1, le=100)

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        allowed = settings.IMAGES_ALLOWED_FORMATS
        if value.upper() not in allowed:
            raise ValueError(f"format {value!r} is not one of {', '.join(allowed)}")
        return value.upper()


class StripMetadata(_Op):
    """Outputs stored from here on carry no EXIF, ICC profile, XMP or comments."""

    op: Literal["strip_metadata"]


class Save(_Op):
    """Stores the image as it is now, as one output."""

    op: Literal["save"]


Operation = Annotated[
    Resize | Thumbnail | Crop | Rotate | Grayscale | AutoOrient | Convert | StripMetadata | Save,
    Field(discriminator="op"),
]
MAX_OPERATIONS = 50
operations_adapter: TypeAdapter[list[Operation]] = TypeAdapter(list[Operation])


def dump_operations(operations: Iterable[Any]) -> list[dict[str, Any]]:
    """Validated operations as JSON, defaults filled in."""
    return [operation.model_dump(mode="json") for operation in operations]


def operations_key(operations: Iterable[Any]) -> str:
    """A digest of the validated list: the same operations (defaults included) name the same outputs."""
    canonical = json.dumps(dump_operations(operations), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- Opening an image safely ---------------------------------------------------------


# Pillow's DecompressionBombError/Warning: "Image size (400000000 pixels) exceeds limit of ...".
_POSSIBLE_BOMB = re.compile(r"Image size \((\d+) pixels\)")


def describe_pixels(pixels: int) -> str:
    return f"{pixels / 1_000_000:.1f} MP"


def open_image(data: bytes) -> Image.Image:
    """An image header read from `data`, checked against the format, size and pixel caps.

    Nothing is decoded yet (Pillow reads pixels lazily): call `load_image`.
    """
    if len(data) > settings.IMAGES_MAX_FILE_BYTES:
        raise ImageError(
            f"the file is {len(data):,} bytes, over the cap of {settings.IMAGES_MAX_FILE_BYTES:,} "
            "(IMAGES_MAX_FILE_BYTES)"
        )
    allowed = list(settings.IMAGES_ALLOWED_FORMATS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=allowed)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow refuses past its own limit (about 89 MP) before we see the size: its message gives
        # the pixel count, which is said our way, naming our cap.
        counted = _POSSIBLE_BOMB.search(str(exc))
        size = f" {describe_pixels(int(counted.group(1)))}," if counted else ""
        raise ImageError(
            f"the image is{size} over the cap of {describe_pixels(settings.IMAGES_MAX_PIXELS)} "
            "(IMAGES_MAX_PIXELS): refused from its header as a possible decompression bomb"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageError(
            f"not an image in an allowed format ({', '.join(allowed)}; IMAGES_ALLOWED_FORMATS)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"the image header cannot be read: {exc}") from None
    pixels = image.width * image.height
    if pixels > settings.IMAGES_MAX_PIXELS:
        raise ImageError(
            f"the image is {image.width}x{image.height} ({describe_pixels(pixels)}), over the cap of "
            f"{describe_pixels(settings.IMAGES_MAX_PIXELS)} (IMAGES_MAX_PIXELS)"
        )
    return image


# Operations that neither read nor change pixels at a particular scale: a thumbnail after
# them may as well be decoded at a reduced scale.
_SCALE_FREE = (AutoOrient, StripMetadata, Convert, Grayscale, Save)


def load_image(image: Image.Image, operations: Sequence[Any] = ()) -> Image.Image:
    """Decodes the pixels (the first frame of an animation); a truncated file raises `ImageError`.

    When the pixels are first thumbnailed (after operations that do not care about
    scale), JPEG decodes straight at a reduced scale (Pillow's draft mode), which
    is most of a thumbnail's cost. The box is square and doubled, so a later turn
    by `auto_orient` and the final Lanczos step never work from fewer pixels than
    the thumbnail needs.
    """
    first = next((op for op in operations if not isinstance(op, _SCALE_FREE)), None)
    try:
        if isinstance(first, Thumbnail):
            side = 2 * max(first.width, first.height)
            image.draft(None, (side, side))
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"the image is truncated or corrupt: {exc}") from None
    return image


# --- Applying operations -------------------------------------------------------------


@dataclass
class Rendition:
    """The image at one step, with how to encode it."""

    step: int
    image: Image.Image
    format: str
    quality: int | None
    keep_metadata: bool
    exif: bytes
    icc_profile: bytes | None


def _check_pixels(image: Image.Image, step: int, operation: Any) -> None:
    pixels = image.width * image.height
    if pixels > settings.IMAGES_MAX_PIXELS:
        raise ImageError(
            f"operation {step} ({operation.op}) makes the image {image.width}x{image.height} "
            f"({describe_pixels(pixels)}), over the cap of {describe_pixels(settings.IMAGES_MAX_PIXELS)}"
        )


def _apply(image: Image.Image, operation: Any, step: int) -> Image.Image:
    match operation:
        case Resize(width=width, height=height):
            return image.resize((width, height), Image.Resampling.LANCZOS)
        case Thumbnail(width=width, height=height):
            image = image.copy() if image.readonly else image
            image.thumbnail((width, height), Image.Resampling.LANCZOS)
            return image
        case Crop(left=left, top=top, right=right, bottom=bottom):
            if right > image.width or bottom > image.height:
                raise ImageError(
                    f"operation {step} (crop): the box ({left}, {top}, {right}, {bottom}) is not inside "
                    f"the {image.width}x{image.height} image"
                )
            return image.crop((left, top, right, bottom))
        case Rotate(degrees=degrees, expand=expand):
            fill = (255,) * len(image.getbands()) if image.mode not in ("P", "1") else None
            return image.rotate(degrees, Image.Resampling.BICUBIC, expand=expand, fillcolor=fill)
        case Grayscale():
            return image.convert("LA" if _has_alpha(image) else "L")
        case AutoOrient():
            return ImageOps.exif_transpose(image) or image
    raise AssertionError(f"unhandled operation {operation!r}")  # pragma: no cover


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def renditions(
    image: Image.Image,
    operations: list[Any],
    on_step: Callable[[int, Any], None] | None = None,
) -> Iterable[Rendition]:
    """Applies `operations` to a loaded image, yielding what each `save` (and the end) stores."""
    source_format = (image.format or "PNG").upper()
    fmt = source_format if source_format in settings.IMAGES_ALLOWED_FORMATS else "PNG"
    quality: int | None = None
    keep_metadata = True
    exif = image.info.get("exif", b"")
    icc_profile = image.info.get("icc_profile")
    saved_last = False

    def rendition(step: int) -> Rendition:
        return Rendition(step, image, fmt, quality, keep_metadata, exif, icc_profile)

    for step, operation in enumerate(operations, start=1):
        saved_last = False
        match operation:
            case Convert(format=new_format, quality=new_quality):
                fmt, quality = new_format, new_quality
            case StripMetadata():
                keep_metadata = False
            case Save():
                yield rendition(step)
                saved_last = True
            case AutoOrient():
                image = _apply(image, operation, step)
                exif = image.getexif().tobytes() if exif else b""  # orientation now reset
            case _:
                image = _apply(image, operation, step)
                _check_pixels(image, step, operation)
        if on_step is not None:
            on_step(step, operation)
    if not saved_last:
        yield rendition(len(operations))


def encode(rendition: Rendition) -> bytes:
    """The rendition's bytes in its format, with or without the source's metadata."""
    image, fmt = rendition.image, rendition.format
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = _flatten(image)
    elif fmt == "GIF" and image.mode not in ("P", "L"):
        image = image.convert("RGBA" if _has_alpha(image) else "RGB").quantize(256)
    elif fmt in ("WEBP", "AVIF") and image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if _has_alpha(image) else "RGB")
    elif fmt == "PNG" and image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    options: dict[str, Any] = {}
    if fmt in LOSSY:
        options["quality"] = rendition.quality or settings.IMAGES_DEFAULT_QUALITY
    if fmt == "JPEG":
        options["optimize"] = True  # smaller files for little time; PNG's optimize is slow on big images
    if rendition.keep_metadata:
        if rendition.exif and fmt in ("JPEG", "WEBP", "PNG", "AVIF"):
            options["exif"] = rendition.exif
        if rendition.icc_profile and fmt in ("JPEG", "WEBP", "PNG", "AVIF"):
            options["icc_profile"] = rendition.icc_profile
    else:
        image = _without_metadata(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _flatten(image: Image.Image) -> Image.Image:
    """Transparent pixels onto white (JPEG has no alpha; dropping it would show black)."""
    if not _has_alpha(image):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _without_metadata(image: Image.Image) -> Image.Image:
    clean = image.copy()
    keep = {"transparency"} if "transparency" in clean.info else set()
    clean.info = {key: value for key, value in clean.info.items() if key in keep}
    return clean


# --- The pipeline on a stored asset --------------------------------------------------


def read_asset(asset: ImageAsset) -> bytes:
    """The asset's bytes, refused unread when the stored file is over the size cap."""
    cap = settings.IMAGES_MAX_FILE_BYTES
    try:
        size = asset.file.size
        if size > cap:
            raise ImageError(f"the file is {size:,} bytes, over the cap of {cap:,} (IMAGES_MAX_FILE_BYTES)")
        with asset.file.open("rb") as handle:
            return handle.read(cap + 1)
    except FileNotFoundError:
        raise ImageError(f"image asset {asset.pk}: its file {asset.file.name!r} is missing") from None
    except OSError as exc:
        raise StorageError(f"image asset {asset.pk}: the file cannot be read: {exc}") from exc
    finally:
        asset.file.close()


def output_name(asset: ImageAsset, key: str, step: int, fmt: str) -> str:
    return f"images/outputs/{asset.pk}/{key[:16]}-{step}.{FORMAT_EXTENSIONS.get(fmt, fmt.lower())}"


def store_output(asset: ImageAsset, key: str, raw: list[dict[str, Any]], rendition: Rendition) -> ImageOutput:
    """Writes one rendition under its fixed name and upserts its row; a rerun replaces both."""
    data = encode(rendition)
    name = output_name(asset, key, rendition.step, rendition.format)
    field = ImageOutput._meta.get_field("file")
    storage = field.storage
    try:
        if storage.exists(name):  # a rerun (or a run cut off after writing): same name, new bytes
            storage.delete(name)
        stored_name = storage.save(name, ContentFile(data))
    except OSError as exc:
        raise StorageError(f"image asset {asset.pk}: the output cannot be stored: {exc}") from exc
    with transaction.atomic():
        output, _ = ImageOutput.objects.update_or_create(
            asset=asset,
            operations_key=key,
            step=rendition.step,
            defaults={
                "operations": raw,
                "file": stored_name,
                "format": rendition.format,
                "width": rendition.image.width,
                "height": rendition.image.height,
            },
        )
    return output


def process(
    asset: ImageAsset,
    operations: list[Any],
    on_progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """Applies validated operations (`operations_adapter`) to the asset and stores every output."""
    key = operations_key(operations)
    dumped = dump_operations(operations)
    image = load_image(open_image(read_asset(asset)), operations)
    total = len(operations) + 1

    def step_done(step: int, operation: Any) -> None:
        if on_progress is not None:
            on_progress(100 * step / total, f"{step}/{len(operations)}: {operation.op}")

    outputs = []
    for rendition in renditions(image, operations, on_step=step_done):
        output = store_output(asset, key, dumped, rendition)
        outputs.append(
            {
                "id": output.pk,
                "step": output.step,
                "name": output.file.name,
                "format": output.format,
                "width": output.width,
                "height": output.height,
                "bytes": output.file.size,
            }
        )
    if on_progress is not None:
        on_progress(100, f"stored {len(outputs)} output(s)")
    return {"asset_id": asset.pk, "operations_key": key, "outputs": outputs}


def inspect_upload(data: bytes) -> tuple[str, int, int]:
    """Format, width and height of an upload that passes every check (decoded once, to be sure)."""
    image = load_image(open_image(data))
    return (image.format or "").upper(), image.width, image.height
