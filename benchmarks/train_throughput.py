"""Training throughput: reslab's engine vs a loop written the way torchvision's reference scripts are.

    .venv/bin/python benchmarks/train_throughput.py [--data-dir ../shared/data/cifar10] [--iters 40]

Both train the same model (ResNet-20 and ResNet-56, batch 128, SGD) on the real CIFAR-10 images in
the same run. The reference decodes PNGs through ``ImageFolder`` with per-sample PIL transforms
(random crop with padding 4, flip, ToTensor, Normalize) in DataLoader workers and trains in NCHW
eager mode (the best of 1 and 2 workers is kept). reslab decodes once into a uint8 tensor, augments
whole batches, and trains in channels_last (optionally compiled). Achieved GFLOP/s are counted
with PyTorch's FLOP counter on one training step, against this machine's measured fp32 matmul peak.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from reslab import create_model
from reslab.config import load_config
from reslab.data import Placement, build_data
from reslab.deploy.timing import matmul_peak
from reslab.engine import Budget, TrainState, TrainStep, build_optimizer, train_one_epoch


def train_flops_per_image(name: str) -> float:
    """FLOPs of one forward + backward pass per image, counted on a real step."""
    model = create_model(name)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / 8


def reference_img_s(name: str, root: Path, iters: int, workers: int) -> float:
    import torchvision
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        ]
    )
    ds = torchvision.datasets.ImageFolder(str(root / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=128, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )
    model = create_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()
    warm, n, t0 = 5, 0, 0.0
    for i, (x, y) in enumerate(loader):
        if i == warm:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(y) if i >= warm else 0
        if i + 1 >= warm + iters:
            break
    return n / (time.perf_counter() - t0)


def reslab_img_s(name: str, root: Path, iters: int, compile: bool) -> float:
    warm = 10 if compile else 5
    cfg = load_config(
        "cifar10_paper",
        {
            "model": name,
            "data.name": "folder",
            "data.dir": str(root),
            "progress": False,
            "compile": compile,
            "iters": warm + iters,
            "log_every": 10**6,
        },
    )
    data = build_data(cfg.data, place=Placement(channels_last=cfg.channels_last), progress=False)
    model = create_model(name).to(memory_format=torch.channels_last)
    train_model = torch.compile(model) if compile else model
    step = TrainStep(train_model, build_optimizer(model, cfg), cfg, torch.device("cpu"))
    state = TrainState()
    batch = cfg.data.batch_size
    data.train.set_epoch(0)
    train_one_epoch(step, data.train, state, cfg, budget=Budget(warm, batch))
    data.train.set_epoch(0, state.epoch_samples)
    t0 = time.perf_counter()
    train_one_epoch(step, data.train, state, cfg, budget=Budget(warm + iters, batch))
    return iters * cfg.data.batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10")
    )
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--iters", type=int, default=40, help="timed iterations per measurement")
    p.add_argument("--compile", action="store_true", help="also measure reslab with torch.compile")
    args = p.parse_args()
    root = Path(args.data_dir)
    peak = matmul_peak()
    print(f"fp32 matmul peak on this machine: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    results = {}
    for name in args.models.split(","):
        flops = train_flops_per_image(name)
        ref = max(reference_img_s(name, root, args.iters, w) for w in (1, 2))
        ours = {"eager": reslab_img_s(name, root, args.iters, compile=False)}
        if args.compile:
            ours["compiled"] = reslab_img_s(name, root, args.iters, compile=True)
        best_path = max(ours, key=ours.get)
        best = ours[best_path]
        results[name] = {
            "reslab_img_s": best,
            "reslab_path": best_path,
            "reslab_paths": ours,
            "reference_img_s": ref,
            "ratio": best / ref,
            "gflops_per_s": best * flops / 1e9,
            "peak_fraction": best * flops / 1e9 / peak,
            "train_gflop_per_img": flops / 1e9,
        }
        r = results[name]
        print(
            f"{name:10s} reference {ref:7.1f} img/s | reslab {best:7.1f} img/s ({best_path}) | ratio {r['ratio']:.2f}x "
            f"| {r['gflops_per_s']:.1f} GFLOP/s = {100 * r['peak_fraction']:.0f}% of peak"
        )
    head = results[args.models.split(",")[0]]
    line = {k: head[k] for k in ("reslab_img_s", "reference_img_s", "ratio", "peak_fraction")}
    line.update(model=args.models.split(",")[0], peak_gflops=peak, models=results)
    print(
        json.dumps(
            line, default=lambda v: round(v, 4) if isinstance(v, float) and math.isfinite(v) else str(v)
        )
    )


if __name__ == "__main__":
    main()
