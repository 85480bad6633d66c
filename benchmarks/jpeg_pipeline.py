"""JPEG decoding and preprocessing throughput: the PIL path on all cores against the batched GPU path.

    .venv/bin/python benchmarks/jpeg_pipeline.py [--device cpu] [--limit N] [--images DIR] [--repeat 4]

The 500 ImageNet sample photos (``../shared/data/imagenet-samples``, looped ``--repeat`` times)
through reslab's two large-image loaders, with the training transform (random-resized crop to
224 and flip) and the evaluation transform (resize 256, center crop 224), normalised on the
device in the batch the model would get:

- ``cpu``: PIL decoding and torchvision transforms in DataLoader workers on every core;
- ``gpu``: workers read the bytes; nvjpeg decodes each batch and two batched matrix products
  crop, resize and flip it on the GPU.

``--device cpu`` measures the CPU path alone (``gpu_img_s`` is null). Prints one line per
measurement, then one JSON line (keys ``cpu_img_s``, ``gpu_img_s``, ``transform``, ``image_size``
for the training transform, and ``eval`` for the evaluation one).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from reslab.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchDecodeLoader,
    FolderLoader,
    Placement,
    imagenet_transforms,
)
from reslab.data.decode import decoder_available
from reslab.engine import resolve_device
from reslab.engine.device import synchronize

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-samples"


def img_s(loader, device: torch.device) -> float:
    """Images per second over one pass, after one warm-up batch (workers started, CUDA ready)."""
    batches = iter(loader)
    next(batches)
    synchronize(device)
    t0, n = time.perf_counter(), 0
    for x, _ in batches:
        n += len(x)
    synchronize(device)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default=str(SAMPLES))
    p.add_argument("--device", default="auto", help="cpu: the CPU path alone")
    p.add_argument("--limit", type=int, help="read only this many images")
    p.add_argument("--repeat", type=int, default=4, help="passes over the images")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    device = resolve_device(args.device)
    files = sorted(Path(args.images).glob("*.JPEG"))[: args.limit]
    samples = [(str(f), i % 1000) for i, f in enumerate(files)] * args.repeat
    gpu = device.type == "cuda" and decoder_available(device)
    resize = round(args.size * 256 / 224)
    common = dict(
        channels=3, workers=args.workers, mean=IMAGENET_MEAN, std=IMAGENET_STD, place=Placement(device)
    )
    result: dict = {
        "image_size": args.size,
        "images": len(samples),
        "device": str(device),
        "workers": args.workers,
    }
    for transform in ("train", "eval"):
        train = transform == "train"
        cpu_loader = FolderLoader(
            samples,
            imagenet_transforms(train, args.size, resize),
            batch_size=args.batch,
            train=train,
            **common,
        )
        row = {"transform": transform, "cpu_img_s": img_s(cpu_loader, device), "gpu_img_s": None}
        if gpu:
            batched = BatchDecodeLoader(
                samples, batch_size=args.batch, train=train, size=args.size, resize=resize, **common
            )
            row["gpu_img_s"] = img_s(batched, device)
        gpu_text = f"{row['gpu_img_s']:.0f}" if row["gpu_img_s"] else "n/a (no CUDA decoder)"
        print(
            f"{transform:5s} {len(samples)} images at {args.size}: cpu {row['cpu_img_s']:.0f} img/s, gpu {gpu_text}",
            flush=True,
        )
        if train:
            result.update(row)
        else:
            result["eval"] = row
    print(json.dumps(result))


if __name__ == "__main__":
    main()
