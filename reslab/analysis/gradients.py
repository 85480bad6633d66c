"""Gradient flow: per-layer gradient norms of plain vs residual networks, at initialisation and
after some training, and optionally the shattered-gradients correlation (Balduzzi et al. 2017)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from reslab.analysis.args import add_common_args
from reslab.analysis.degradation import twins
from reslab.analysis.inputs import data_fields, data_identity
from reslab.analysis.output import finish, md_table, pyplot, study_dir, write_summary
from reslab.config import NON_NEGATIVE, POSITIVE, arg_type, int_list, json_text, load_config
from reslab.data import Placement, build_data, fixed_batches
from reslab.engine import Budget, TrainState, TrainStep, build_optimizer, resolve_device, train_one_epoch
from reslab.models import create_model

HELP = "per-layer gradient norms of plain vs residual nets, at init and after training"


def conv_grad_norms(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable = F.cross_entropy
) -> list[tuple[str, float]]:
    """The gradient norm of every conv weight on the residual path side (shortcut projections
    excluded), in depth order, for one batch in training mode."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    return [
        (name, m.weight.grad.norm().item())
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Conv3d) and "downsample" not in name and m.weight.grad is not None
    ]


def gradient_correlation(model: nn.Module, x0: torch.Tensor, points: int = 128, seed: int = 0) -> list[float]:
    """Mean cosine similarity of input gradients between points ``lag`` apart on a line through input
    space, for lag = 0 .. points/2. Deep plain nets decorrelate fast (white noise); ResNets do not."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(x0.shape, generator=g).to(x0.device)
    direction *= x0.norm() / direction.norm()
    t = torch.linspace(-0.5, 0.5, points, device=x0.device).view(-1, *[1] * x0.ndim)
    xs = (x0 + t * direction).requires_grad_(True)
    model.train()
    out = model(xs)
    grads = torch.autograd.grad(out[:, 0].sum(), xs)[0].flatten(1)
    grads = F.normalize(grads, dim=1)
    return [(grads[: points - k] * grads[k:]).sum(1).mean().item() for k in range(points // 2)]


def run(
    depths: list[int],
    *,
    out: str | Path | None = None,
    steps: int = 100,
    batch: int = 128,
    data: str | None = None,
    data_dir: str | None = None,
    correlation: bool = False,
    seed: int = 0,
    progress: bool = True,
    device: str = "auto",
) -> dict[str, Any]:
    fields = data_fields(data, data_dir)
    identity = {
        "depths": depths,
        "steps": steps,
        "batch": batch,
        "correlation": correlation,
        "seed": seed,
        "data": data_identity(fields),
    }
    out = study_dir(out, "gradients", identity)
    dev = resolve_device(device)
    x, y = fixed_batches({"data": fields}, None, split="train", limit=batch, batch_size=batch, device=dev)[0]
    cfg = load_config(
        overrides={
            **{f"data.{k}": v for k, v in fields.items()},
            "data.batch_size": batch,
            "iters": max(1, steps),
            "sched.name": "constant",
            "sched.warmup_iters": steps // 2,
            "sched.warmup_factor": 0.01,
            "progress": False,
            "log_every": 10**6,
        }
    )
    train_data = build_data(cfg.data, place=Placement(dev, seed=seed), progress=False) if steps else None
    models = []
    jobs = [(d, *t) for d in depths for t in twins(d)]
    for depth, name, args, residual in tqdm(jobs, desc="models", disable=not progress, leave=False):
        torch.manual_seed(seed)
        classes = int(y.max()) + 1 if train_data is None else len(train_data.classes)
        model = create_model(name, num_classes=classes, in_chans=x.shape[1], **args).to(dev)
        row: dict[str, Any] = {
            "name": f"{'resnet' if residual else 'plain'}{depth}",
            "depth": depth,
            "residual": residual,
            "init": conv_grad_norms(model, x, y),
        }
        if correlation:
            row["correlation"] = gradient_correlation(model, x[0], seed=seed)
        if steps:
            step = TrainStep(model, build_optimizer(model, cfg), cfg, dev)
            state, budget = TrainState(), Budget(steps, batch)
            while not budget.done(state):
                train_data.train.set_epoch(state.epoch)
                train_one_epoch(step, train_data.train, state, cfg, budget=budget)
                state.end_epoch()
            row["trained"] = conv_grad_norms(model, x, y)
        for key in ("init", "trained"):
            if key in row:
                norms = [v for _, v in row[key]]
                row[f"{key}_first_last_ratio"] = norms[0] / max(norms[-1], 1e-30)
        models.append(row)
    _plot(models, out / "gradient_norms.png", steps)
    if correlation:
        _plot_correlation(models, out / "gradient_correlation.png")
    (out / "gradient_norms.json").write_text(json_text(models))
    table = [
        {k: m.get(k) for k in ("name", "init_first_last_ratio", "trained_first_last_ratio")} for m in models
    ]
    md = [
        "# Gradient flow",
        "",
        f"Gradient norm of the first conv divided by that of the last conv, on one batch "
        f"of {batch} real images, at initialisation and after {steps} training steps.",
        "",
        md_table(
            table,
            [
                ("name", "model"),
                ("init_first_last_ratio", "first/last at init"),
                ("trained_first_last_ratio", f"first/last after {steps} steps"),
            ],
        ),
        "",
        "![gradient norms](gradient_norms.png)",
    ]
    if correlation:
        md.append("![gradient correlation](gradient_correlation.png)")
    summary = {
        "steps": steps,
        "batch": batch,
        "models": [
            {k: v for k, v in m.items() if k not in ("init", "trained", "correlation")} for m in models
        ],
    }
    write_summary(out, "gradients", summary, "\n".join(md))
    return {"out": str(out), **summary}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_args(p, "gradients", data="the embedded MNIST sample")
    p.add_argument("--depths", type=int_list(POSITIVE), default=[20, 56, 110], help="default 20,56,110")
    p.add_argument(
        "--steps",
        type=arg_type(int, NON_NEGATIVE),
        default=100,
        help="training steps before the second measurement",
    )
    p.add_argument("--batch", type=arg_type(int, POSITIVE), default=128)
    p.add_argument(
        "--correlation", action="store_true", help="also the shattered-gradients correlation curve"
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run(
        args.depths,
        out=args.out,
        steps=args.steps,
        batch=args.batch,
        data=args.data,
        data_dir=args.data_dir,
        correlation=args.correlation,
        seed=args.seed,
        progress=args.progress,
        device=args.device,
    )


def _plot(models: list[dict[str, Any]], path: Path, steps: int) -> None:
    plt = pyplot()
    keys = [k for k in ("init", "trained") if k in models[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    depths = sorted({m["depth"] for m in models})
    for ax, key in zip(axes[0], keys):
        for m in models:
            norms = [v for _, v in m[key]]
            ax.plot(
                range(1, len(norms) + 1),
                norms,
                color=f"C{depths.index(m['depth'])}",
                ls="-" if m["residual"] else "--",
                lw=1.5,
                label=m["name"],
            )
        ax.set_yscale("log")
        ax.set_xlabel("conv layer (input to output)")
        ax.set_ylabel("gradient norm")
        ax.set_title("at initialisation" if key == "init" else f"after {steps} steps")
    finish(fig, path, *axes[0])


def _plot_correlation(models: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    depths = sorted({m["depth"] for m in models})
    for m in models:
        ax.plot(
            m["correlation"],
            color=f"C{depths.index(m['depth'])}",
            ls="-" if m["residual"] else "--",
            label=m["name"],
        )
    ax.set_xlabel("distance between inputs (points on a line)")
    ax.set_ylabel("gradient correlation (cosine)")
    ax.set_title("shattered gradients (Balduzzi et al. 2017), at initialisation")
    finish(fig, path, ax)
