"""Images per second for a 12-megapixel thumbnail: the service in-process, then through real workers.

    .venv/bin/python -m bench.images [--images 40] [--concurrency 2] [--database-url postgres://...]
        [--broker-url redis://...]

Makes a 4000x3000 JPEG with photo-like detail (about 5.6 MiB at quality 90), then:
(1) in this process, `tasks.services.images.process` with
`[auto_orient, thumbnail 256x256, strip_metadata]` on it, N times, interleaved
with two plain Pillow loops on the same bytes, N times each: decoding the whole image
before thumbnailing (the baseline of the goal: ours at least 3x), and Pillow's
own `Image.open().thumbnail()` (which drafts by itself: no storage, encoding or
row, the floor); (2) N `images.process` tasks, one asset each, through
`celery -A config worker -Q images -c C`, timed from sending to the last result.
Prints images/s, latency percentiles, our rate over each plain loop's, and peak
RSS (this process; the worker's process tree, sampled), and writes them to docs/results/images.json.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.support import TreeSampler, ensure_database, worker_process, write_results  # noqa: E402

OPERATIONS = [
    {"op": "auto_orient"},
    {"op": "thumbnail", "width": 256, "height": 256},
    {"op": "strip_metadata"},
]


def latency(samples: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50_ms": cuts[49] * 1000, "p95_ms": cuts[94] * 1000, "p99_ms": cuts[98] * 1000}


def percentiles(samples: list[float]) -> str:
    cut = latency(samples)
    return f"p50 {cut['p50_ms']:6.0f} ms  p95 {cut['p95_ms']:6.0f} ms  p99 {cut['p99_ms']:6.0f} ms"


def photo(width: int = 4000, height: int = 3000) -> bytes:
    """A JPEG with noise over gradients: compresses like a photo, unlike a flat test card."""
    from PIL import Image

    noise = Image.effect_noise((width, height), 40).convert("RGB")
    gradient = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    image = Image.blend(gradient, noise, 0.5)
    exif = Image.Exif()
    exif[0x010F] = "Bench Camera"
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/bench_images"),
    )
    parser.add_argument("--broker-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/7"))
    options = parser.parse_args()

    ensure_database(options.database_url)
    os.environ.update(
        DJANGO_SETTINGS_MODULE="config.settings.test",
        DATABASE_URL=options.database_url,
        CELERY_BROKER_URL=options.broker_url,
        MEDIA_ROOT=tempfile.mkdtemp(prefix="bench-images-"),
        LOG_LEVEL="WARNING",
    )
    import django

    django.setup()
    from django.core.files.base import ContentFile
    from django.core.management import call_command
    from PIL import Image

    from config.celery_app import app
    from tasks import images
    from tasks.models import ImageAsset
    from tasks.services import images as service

    call_command("migrate", verbosity=0)
    ImageAsset.objects.all().delete()
    data = photo()
    print(f"source: 4000x3000 JPEG, {len(data) / 2**20:.1f} MiB; {options.images} images; {OPERATIONS}")

    # (1) In this process.
    asset = ImageAsset.objects.create(file=ContentFile(data, name="bench.jpg"), original_name="bench.jpg")
    operations = service.operations_adapter.validate_python(OPERATIONS)
    service.process(asset, operations)  # warm-up

    def full_decode() -> None:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decoded at full size, no draft
            image.thumbnail((256, 256), Image.Resampling.LANCZOS)

    def pillow_thumbnail() -> None:
        with Image.open(io.BytesIO(data)) as image:
            image.thumbnail((256, 256), Image.Resampling.LANCZOS)  # Pillow drafts, reducing_gap 2

    # Ours and the plain loops on the same bytes, interleaved (one of each in turn, so a busy
    # machine slows all three alike): Pillow decoding the whole image then thumbnailing (what the
    # issue's goal is measured against: ours at least 3x), and Pillow's own
    # `Image.open().thumbnail()`, which drafts by itself (the floor: no storage, encoding or row).
    timings: list[float] = []
    full: list[float] = []
    pillow: list[float] = []
    for _ in range(options.images):
        for samples, work in (
            (timings, lambda: service.process(asset, operations)),
            (full, full_decode),
            (pillow, pillow_thumbnail),
        ):
            started = time.perf_counter()
            work()
            samples.append(time.perf_counter() - started)
    print(f"service, in-process        {len(timings) / sum(timings):6.1f} images/s  {percentiles(timings)}")
    print(f"plain Pillow, full decode  {len(full) / sum(full):6.1f} images/s  {percentiles(full)}")
    print(f"Pillow's thumbnail() alone {len(pillow) / sum(pillow):6.1f} images/s  {percentiles(pillow)}")
    figures: dict[str, Any] = {
        "source_mib": len(data) / 2**20,
        "in_process": {
            "images": len(timings),
            "images_per_s": len(timings) / sum(timings),
            **latency(timings),
        },
    }
    ours = figures["in_process"]["images_per_s"]
    figures["plain_pillow_full_decode"] = {
        "images": len(full),
        "images_per_s": len(full) / sum(full),
        **latency(full),
    }
    figures["pillow_thumbnail_alone"] = {
        "images": len(pillow),
        "images_per_s": len(pillow) / sum(pillow),
        **latency(pillow),
    }
    figures["in_process_over_full_decode"] = ours / figures["plain_pillow_full_decode"]["images_per_s"]
    figures["in_process_over_pillow_thumbnail"] = ours / figures["pillow_thumbnail_alone"]["images_per_s"]
    print(
        f"ours in-process / full decode loop: {figures['in_process_over_full_decode']:.2f}x "
        f"(goal: at least 3x); over Pillow's thumbnail() alone: "
        f"{figures['in_process_over_pillow_thumbnail']:.2f}x"
    )
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    figures["in_process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # (2) Through a real worker on the images queue.
    assets = [
        ImageAsset.objects.create(file=ContentFile(data, name=f"bench-{n}.jpg"), original_name=f"bench-{n}")
        for n in range(options.images)
    ]
    with worker_process(app, "images", options.concurrency) as worker:
        sampler = TreeSampler(worker.pid)
        started = time.perf_counter()
        sent = [
            (time.perf_counter(), images.process.delay(asset_id=a.pk, operations=OPERATIONS)) for a in assets
        ]
        latencies = []
        for sent_at, result in sent:
            result.get(timeout=600, interval=0.01)
            latencies.append(time.perf_counter() - sent_at)
        elapsed = time.perf_counter() - started
        tree_peak = sampler.stop()
    print(
        f"worker -c {options.concurrency}, end to end    {len(sent) / elapsed:6.1f} images/s  "
        f"(send to result: {percentiles(latencies)}; queueing included)"
    )
    print(f"peak RSS of the worker's process tree: {tree_peak / 2**20:.0f} MiB (sampled every 50 ms)")
    figures["worker"] = {
        "concurrency": options.concurrency,
        "images": len(sent),
        "images_per_s": len(sent) / elapsed,
        "send_to_result": latency(latencies),
        "process_tree_peak_rss_mib": tree_peak / 2**20,
    }
    write_results(
        "images", figures, vars(options), database_url=options.database_url, redis_url=options.broker_url
    )


if __name__ == "__main__":
    main()
