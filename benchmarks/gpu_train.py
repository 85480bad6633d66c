"""Training throughput on the current device: reslab's engine against a torchvision-style loop.

    .venv/bin/python benchmarks/gpu_train.py [--device cuda|cpu] [--models resnet20,resnet56,resnet50]
                                             [--iters 50] [--data-dir ../shared/data/cifar10]

In one run, for ResNet-20 and ResNet-56 (batch 128, 32x32) and ResNet-50 (batch 256, 224x224):

- ``reference``: a loop written as torchvision's reference scripts are: the CIFAR-10 PNGs through
  ``ImageFolder`` with per-sample transforms (random crop with padding 4, flip, normalise) in
  DataLoader workers, fp32, NCHW, eager (on a CPU the best of 1 and 2 workers). ResNet-50 and runs
  without the CIFAR folder use synthetic batches already on the device.
- ``eager``: reslab's engine (``train_one_epoch`` with its schedule, logging and counters) on its
  in-memory loader (uint8 images on the device, augmented a batch at a time), channels_last, with
  the device's default precision (bf16 autocast on CUDA, fp32 on CPUs).
- ``graphs``: the same with the whole step captured in one CUDA graph (CUDA only).
- ``compiled``: the same with ``torch.compile``.

Prints a table, then one JSON line: ``{"models": [{"model", "reference_img_s", "reslab_img_s",
"ratio", "path", ...}], "device": ...}``. On a CPU each row also gives the achieved GFLOP/s as a
fraction of this machine's measured fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms as T

from reslab import create_model
from reslab.config import load_config
from reslab.data import Placement, TensorLoader, build_data
from reslab.engine import Budget, TrainState, build_optimizer, resolve_device, train_one_epoch
from reslab.engine.device import for_device, synchronize
from reslab.engine.graphs import CapturedStep
from reslab.engine.timing import matmul_peak
from reslab.engine.train import TrainStep

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
SHAPES = {"resnet50": (256, 224)}  # batch, image size; the CIFAR nets: 128, 32
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def shape(name: str) -> tuple[int, int]:
    return SHAPES.get(name, (128, 32))


def timed(step_once, iters: int, warmup: int, device: torch.device, batch: int) -> float:
    """Images per second over ``iters`` calls of ``step_once`` after ``warmup`` calls."""
    for _ in range(warmup):
        step_once()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step_once()
    synchronize(device)
    return iters * batch / (time.perf_counter() - t0)


def reference_img_s(name: str, device: torch.device, iters: int, warmup: int, data_dir: Path | None) -> float:
    """A torchvision-reference-style loop: fp32, NCHW, eager, data from ImageFolder workers."""
    batch, size = shape(name)
    model = create_model(name, num_classes=10 if size == 32 else 1000).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if data_dir is None or size != 32:  # synthetic batches on the device: the model and loop alone
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, model.num_classes, (batch,), device=device)
        return timed(lambda: step(x, y), iters, warmup, device, batch)
    tf = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(str(data_dir / "train"), transform=tf)
    best = 0.0
    cpus = os.cpu_count() or 1
    for workers in (1, 2) if device.type == "cpu" else (min(8, cpus),):
        loader = torch.utils.data.DataLoader(
            dataset, batch, shuffle=True, num_workers=workers, drop_last=True, pin_memory=device.type == "cuda",
            persistent_workers=True,
        )  # fmt: skip

        batches = iter(loader)
        best = max(best, timed(partial(_next_batch, step, batches, device), iters, warmup, device, batch))
    return best


def _next_batch(step, batches, device: torch.device) -> None:
    x, y = next(batches)
    step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))


def reslab_loader(name: str, device: torch.device, data_dir: Path | None):
    """reslab's in-memory loader: CIFAR-10 decoded once (or synthetic uint8 images) on the device."""
    batch, size = shape(name)
    place = Placement(device, channels_last=True)
    if data_dir is not None and size == 32:
        cfg = load_config(
            "cifar10_paper", {"data.name": "folder", "data.dir": str(data_dir), "data.batch_size": batch}
        )
        return build_data(cfg.data, place=place, progress=False).train
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2 * batch, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10 if size == 32 else 1000, (2 * batch,), generator=g)
    mean, std = (CIFAR_MEAN, CIFAR_STD) if size == 32 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return TensorLoader(
        images, labels, batch_size=batch, train=True, mean=mean, std=std, augment="crop_flip", place=place
    )


def reslab_img_s(
    name: str, device: torch.device, path: str, iters: int, warmup: int, data_dir: Path | None
) -> float:
    """reslab's engine: ``train_one_epoch`` over the in-memory loader, as ``reslab train`` runs it."""
    batch, size = shape(name)
    loader = reslab_loader(name, device, data_dir)
    cfg = for_device(
        load_config(
            "cifar10_paper", {"progress": False, "log_every": 10**6, "compile": "off", "cuda_graphs": "off"}
        ),
        device,
        size,
    )
    model = create_model(name, num_classes=10 if size == 32 else 1000).to(
        device, memory_format=torch.channels_last
    )
    train_model = torch.compile(model) if path == "compiled" else model
    optimizer = build_optimizer(model, cfg)
    step = (
        CapturedStep(model, optimizer, cfg, device)
        if path == "graphs"
        else TrainStep(train_model, optimizer, cfg, device)
    )
    state = TrainState()

    def run(n: int) -> None:
        budget = Budget(state.iteration + n, batch)
        while not budget.done(state):
            loader.set_epoch(state.epoch, state.epoch_samples)
            if train_one_epoch(step, loader, state, cfg, budget=budget):
                state.end_epoch()

    run(warmup)
    synchronize(device)
    t0 = time.perf_counter()
    run(iters)
    synchronize(device)
    return iters * batch / (time.perf_counter() - t0)


def train_flops_per_image(name: str) -> float:
    """FLOPs of one forward and backward pass per image, counted on a real step."""
    _, size = shape(name)
    model = create_model(name, num_classes=10)
    x, y = torch.randn(2, 3, size, size), torch.randint(0, 10, (2,))
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="default: cuda when available")
    p.add_argument("--models", default="resnet20,resnet56,resnet50", help="comma-separated")
    p.add_argument("--iters", type=int, default=50, help="timed iterations per measurement")
    p.add_argument(
        "--warmup", type=int, default=10, help="untimed iterations first (capture, compile, cuDNN)"
    )
    p.add_argument("--data-dir", default=str(CIFAR), help="CIFAR-10 class folders (synthetic data without)")
    p.add_argument("--paths", default="eager,graphs,compiled", help="reslab paths to measure")
    args = p.parse_args()
    device = resolve_device(args.device)
    data_dir = Path(args.data_dir) if Path(args.data_dir, "train").is_dir() else None
    paths = [x for x in args.paths.split(",") if x and (x != "graphs" or device.type == "cuda")]
    peak = matmul_peak(device=device) if device.type == "cpu" else None
    name_of = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"device: {name_of}; CIFAR data: {data_dir or 'synthetic'}"
        + (f"; fp32 matmul peak {peak:.0f} GFLOP/s" if peak else "")
    )
    rows = []
    for name in args.models.split(","):
        ref = reference_img_s(name, device, args.iters, args.warmup, data_dir)
        ours = {path: reslab_img_s(name, device, path, args.iters, args.warmup, data_dir) for path in paths}
        best = max(ours, key=ours.get)
        row = {
            "model": name,
            "batch": shape(name)[0],
            "image_size": shape(name)[1],
            "reference_img_s": ref,
            "reslab_img_s": ours[best],
            "ratio": ours[best] / ref,
            "path": best,
            "paths": ours,
        }
        if peak:
            row["peak_fraction"] = ours[best] * train_flops_per_image(name) / 1e9 / peak
        rows.append(row)
        measured = "  ".join(f"{k} {v:8.1f}" for k, v in ours.items())
        extra = f"  {100 * row['peak_fraction']:.0f}% of peak" if peak else ""
        print(
            f"{name:10s} reference {ref:8.1f} img/s | {measured} | best {best}: {row['ratio']:.2f}x{extra}",
            flush=True,
        )
    clean = json.loads(
        json.dumps(rows, default=float),
        parse_float=lambda v: round(float(v), 4) if math.isfinite(float(v)) else v,
    )
    print(json.dumps({"models": clean, "device": name_of, "data": "cifar10" if data_dir else "synthetic"}))


if __name__ == "__main__":
    main()
