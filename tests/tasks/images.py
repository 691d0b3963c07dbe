"""Builders for test images: real files in real formats, made with Pillow, plus hostile ones."""

from __future__ import annotations

import io
import struct
import zlib

from django.core.files.base import ContentFile
from PIL import Image

from tasks.models import ImageAsset


def picture(size: tuple[int, int] = (640, 480), mode: str = "RGB") -> Image.Image:
    """A gradient with a marker in the top-left quarter, so crops and rotations are visible."""
    width, height = size
    image = Image.linear_gradient("L").resize(size).convert(mode)
    marker = Image.new(mode, (max(1, width // 4), max(1, height // 4)), "red" if mode != "L" else 0)
    image.paste(marker, (0, 0))
    return image


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg_with_exif(size: tuple[int, int] = (640, 480), orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "Test Camera"  # Make
    exif[0x0112] = orientation  # Orientation
    exif[0x8825] = {0x0001: "N", 0x0002: (52.0, 31.0, 12.0)}  # GPS: where the photo was taken
    return encoded(picture(size), "JPEG", exif=exif, icc_profile=b"\0" * 128, quality=90)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims `width` x `height` grey pixels (10 GB when decoded)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 16, 9)  # the first rows; the rest would follow
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows)


def asset(data: bytes, name: str = "upload.jpg") -> ImageAsset:
    return ImageAsset.objects.create(file=ContentFile(data, name=name), original_name=name)
