"""The large-image input pipeline as users feel it: per stage, per loader, and feeding training.

    .venv/bin/python benchmarks/jpeg_pipeline.py [--device cuda|cpu] [--limit N] [--model NAME]
        [--size PX] [--batch N] [--workers N] [--batches-per-worker 20] [--no-train] [--decode cpu,gpu]

The ImageNet sample photos (``../shared/data/imagenet-samples``, looped as often as needed) go
through each decoding path available on the device, ``cpu`` (libjpeg-turbo in DataLoader workers)
and, on CUDA, ``gpu`` (nvjpeg batches, geometry on the GPU, in a background thread):

1. ``stages_ms``: milliseconds per image of reading the bytes, decoding, the training crop/resize
   and normalising/copying to the device, measured one after another in this process (one image at
   a time on one thread for the CPU path, as a worker runs; a whole batch on the device for the GPU
   path);
2. ``loader_img_s``: the training and evaluation loaders alone, in steady state: at least
   ``--batches-per-worker`` batches per worker, timed only after the batches the workers can
   prefetch (two each) are gone, so prefetching cannot hide the work;
3. ``train_img_s``: training steps of ``--model`` fed by the training loader, against the same
   steps on one synthetic batch already on the device (``synthetic_img_s``), with the device's
   training defaults (CUDA: bf16, channels_last, compiled; CPUs: fp32, eager):
   ``fed_fraction = train_img_s / synthetic_img_s``.

In the same run, torchvision's reference loader (an ImageFolder-style dataset: PIL, the v2
transforms with ToDtype and Normalize per image, default collate, the same workers) is timed like
(2), and ``auto``'s measured choice is reported. Defaults: ResNet-50 at 224 px, batch 256 on CUDA;
ResNet-18 at 112 px, batch 32 on CPUs. Prints one line per measurement, then one JSON line whose
top level has ``decode`` (the path auto picks), its ``stages_ms`` and ``fed_fraction``, and
``paths`` with every path's numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from reslab.config import load_config
from reslab.data import IMAGENET_MEAN, IMAGENET_STD, BatchDecodeLoader, FolderLoader, Geometry, Placement
from reslab.data.batched import choose_decode, decode_images, gpu_decoder_works
from reslab.data.decode import decode_bytes
from reslab.data.loader import Uint8Normalizer, default_workers
from reslab.engine import TrainStep, build_optimizer, resolve_device
from reslab.engine.device import for_device, synchronize
from reslab.models import create_model

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-samples"
PREFETCH = 2  # DataLoader's prefetch_factor: batches each worker may hold ready


def steady(batches, skip: int, count: int, device: torch.device, step=None) -> float:
    """Images per second over ``count`` batches received after the first ``skip`` + 1 (those the
    workers may have prepared ahead), running ``step(x, y)`` on each if given."""
    n, t0 = 0, None
    for i, (x, y) in enumerate(batches):
        if step is not None:
            step(x, y)
        if i == skip:
            synchronize(device)
            t0 = time.perf_counter()
        elif i > skip:
            n += len(y)
            if i == skip + count:
                break
    synchronize(device)
    if t0 is None or n == 0:
        raise SystemExit(f"only {i + 1} batches: raise --limit or lower --batch")
    return n / (time.perf_counter() - t0)


def timed_ms(
    fn, items: list, per: int | None = None, device: torch.device | None = None
) -> tuple[float, list]:
    """Milliseconds per item of ``fn`` over ``items`` (one call per item, or one call for all)."""
    if device is not None:
        synchronize(device)
    t0 = time.perf_counter()
    out = [fn(x) for x in items] if per is None else fn(items)
    if device is not None:
        synchronize(device)
    return 1e3 * (time.perf_counter() - t0) / (per or len(items)), out


def stages(decode: str, files: list[Path], size: int, device: torch.device, batch: int) -> dict[str, Any]:
    """Per-image milliseconds of each stage of one path, on up to one batch of photos."""
    files = files[:batch]
    geometry = Geometry((size, size), round(size * 256 / 224), train=True)
    normalize = Uint8Normalizer(IMAGENET_MEAN, IMAGENET_STD, 4, device)
    read_ms, datas = timed_ms(lambda f: f.read_bytes(), files)
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    threads = torch.get_num_threads()
    if decode == "cpu":  # as a worker runs: one image after another, one thread
        torch.set_num_threads(1)
        decode_ms, images = timed_ms(decode_bytes, tensors)
        crop_ms, crops = timed_ms(lambda im: geometry(im, 0), images)
        torch.set_num_threads(threads)
    else:
        paths = [str(f) for f in files]
        decode_images(tensors, paths, device)  # nvjpeg's start-up
        decode_ms, images = timed_ms(lambda t: decode_images(t, paths, device), tensors, len(tensors), device)
        crop_ms, crops = timed_ms(lambda im: geometry(im, 0), images, device=device)
    batch_u8 = torch.stack(crops)
    if device.type == "cuda" and decode == "cpu":
        batch_u8 = batch_u8.pin_memory()
    normalise_ms, _ = timed_ms(lambda x: normalize(x, True), batch_u8, len(batch_u8), device)
    out = {"read": read_ms, "decode": decode_ms, "crop_resize": crop_ms, "normalise_copy": normalise_ms}
    if decode == "gpu":  # nvjpeg's pixels against libjpeg-turbo's, same geometry (evaluation)
        evaluate = Geometry((size, size), round(size * 256 / 224))
        ref = torch.stack([evaluate(decode_bytes(t)) for t in tensors]).float()
        got = torch.stack([evaluate(im) for im in images]).cpu().float()
        out["vs_cpu_decoder"] = {
            "max": (ref - got).abs().max().item(),
            "mean": (ref - got).abs().mean().item(),
        }
    return out


class Reference(Dataset):
    """torchvision's classic pipeline: PIL decode and transforms per image, float output."""

    def __init__(self, samples: list[tuple[str, int]], train: bool, size: int) -> None:
        geometry = (
            [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
            if train
            else [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
        )
        self.samples = samples
        self.transform = v2.Compose(
            [
                *geometry,
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        with Image.open(path) as im:
            return self.transform(im.convert("RGB")), label


def reference_batches(samples, train: bool, size: int, batch: int, workers: int, device: torch.device):
    loader = DataLoader(
        Reference(samples, train, size),
        batch_size=batch,
        shuffle=train,
        drop_last=train,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def loader(decode: str, samples, train: bool, size: int, batch: int, workers: int, device: torch.device):
    geometry = Geometry((size, size), round(size * 256 / 224), train=train)
    kind = BatchDecodeLoader if decode == "gpu" else FolderLoader
    extra = {"draft": True} if decode == "cpu" else {}
    return kind(
        samples,
        geometry,
        batch_size=batch,
        train=train,
        channels=3,
        workers=workers,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        place=Placement(device, channels_last=True),
        **extra,
    )


def trainer(model_name: str, size: int, device: torch.device):
    """A training step with the device's defaults (reslab's engine), warmed up on a synthetic batch."""
    cfg = for_device(load_config(overrides={"model": model_name, "channels_last": True}), device, size)
    model = create_model(model_name, num_classes=1000).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    net = torch.compile(model) if cfg.compile == "on" else model
    step = TrainStep(net, optimizer, cfg, device)
    model.train()
    return step, cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default=str(SAMPLES))
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int, help="use only this many photos (looped as often as needed)")
    p.add_argument("--model", help="default resnet50 on CUDA, resnet18 on CPUs")
    p.add_argument("--size", type=int, help="default 224 on CUDA, 112 on CPUs")
    p.add_argument("--batch", type=int, help="default 256 on CUDA, 32 on CPUs")
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--batches-per-worker", type=int, default=20)
    p.add_argument("--no-train", dest="train", action="store_false", help="loaders only")
    p.add_argument(
        "--decode",
        help="comma-separated paths (default: cpu, and gpu on CUDA; gpu on a CPU runs the batched path there)",
    )
    args = p.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    model_name = args.model or ("resnet50" if cuda else "resnet18")
    size, batch = args.size or (224 if cuda else 112), args.batch or (256 if cuda else 32)
    files = sorted(Path(args.images).glob("*.JPEG"))[: args.limit]
    if not files:
        raise SystemExit(f"no .JPEG files in {args.images}")
    workers = max(1, args.workers)
    skip = PREFETCH * workers
    count = max(args.batches_per_worker * workers, 10)
    needed = (skip + count + 2) * batch
    samples = [(str(f), i % 1000) for i, f in enumerate(files * math.ceil(needed / len(files)))][:needed]
    paths = (args.decode or "cpu" + (",gpu" if cuda and gpu_decoder_works(device) else "")).split(",")
    geometry = Geometry((size, size), round(size * 256 / 224), train=True)
    auto, how = choose_decode("auto", device, samples, geometry, 3, workers)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "photos": len(files),
        "workers": workers,
        "batch": batch,
        "image_size": size,
        "model": model_name if args.train else None,
        "timed_batches": count,
        "auto": {"decode": auto, **how},
        "paths": {},
    }
    print(f"{result['device']}: {len(files)} photos, {workers} workers, batch {batch}, {size} px", flush=True)
    ref = {
        t: steady(reference_batches(samples, t == "train", size, batch, workers, device), skip, count, device)
        for t in ("train", "eval")
    }
    result["torchvision_loader_img_s"] = ref
    print(
        f"torchvision ImageFolder-style loader: train {ref['train']:.0f} img/s, eval {ref['eval']:.0f}",
        flush=True,
    )
    step = None
    if args.train:
        step, cfg = trainer(model_name, size, device)
        x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), device=device)
        synthetic = steady(((x, y) for _ in range(skip + count + 1)), skip, count, device, step)
        result.update(synthetic_img_s=synthetic, amp=cfg.amp, compile=cfg.compile)
        print(f"{model_name} training on one synthetic batch: {synthetic:.0f} img/s", flush=True)
    for decode in paths:
        row: dict[str, Any] = {"decode": decode, "stages_ms": stages(decode, files, size, device, batch)}
        row["loader_img_s"] = {
            t: steady(
                loader(decode, samples, t == "train", size, batch, workers, device), skip, count, device
            )
            for t in ("train", "eval")
        }
        row["vs_torchvision"] = {t: row["loader_img_s"][t] / ref[t] for t in ref}
        if step is not None:
            fed = loader(decode, samples, True, size, batch, workers, device)
            row["train_img_s"] = steady(fed, skip, count, device, step)
            row["fed_fraction"] = row["train_img_s"] / result["synthetic_img_s"]
        stage_text = ", ".join(f"{k} {v:.2f}" for k, v in row["stages_ms"].items() if isinstance(v, float))
        print(
            f"{decode}: stages (ms/img) {stage_text}; loader train {row['loader_img_s']['train']:.0f} img/s "
            f"({row['vs_torchvision']['train']:.2f}x torchvision), eval {row['loader_img_s']['eval']:.0f} "
            f"({row['vs_torchvision']['eval']:.2f}x)"
            + (
                f"; training {row['train_img_s']:.0f} img/s, fed {100 * row['fed_fraction']:.0f}%"
                if step
                else ""
            ),
            flush=True,
        )
        result["paths"][decode] = row
    if "gpu" in result["paths"]:
        rates = {d: r["loader_img_s"]["train"] for d, r in result["paths"].items()}
        result["gpu_vs_cpu_loader"] = rates["gpu"] / rates["cpu"]
    chosen = result["paths"].get(auto, {})
    result.update(decode=auto, stages_ms=chosen.get("stages_ms"), fed_fraction=chosen.get("fed_fraction"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
