"""Gradient flow: per-layer gradient norms of plain vs residual networks, at initialisation and
after some training, and optionally the shattered-gradients correlation (Balduzzi et al. 2017)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reslab.analysis.common import finish, md_table, pyplot, study_dir, write_summary
from reslab.analysis.degradation import twins
from reslab.data import fixed_batches


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
    direction = torch.randn(x0.shape, generator=g)
    direction *= x0.norm() / direction.norm()
    t = torch.linspace(-0.5, 0.5, points).view(-1, *[1] * x0.ndim)
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
) -> dict[str, Any]:
    from tqdm import tqdm

    from reslab.config import load_config
    from reslab.data import build_data
    from reslab.engine.loop import Budget, TrainState, build_optimizer, train_one_epoch
    from reslab.models import create_model

    out = study_dir(out, "gradients")
    data_fields = {
        "name": data or ("folder" if data_dir else "default"),
        **({"dir": data_dir} if data_dir else {}),
    }
    x, y = fixed_batches({"data": data_fields}, split="train", limit=batch, batch_size=batch)[0]
    cfg = load_config(
        overrides={
            **{f"data.{k}": v for k, v in data_fields.items()},
            "data.batch_size": batch,
            "iters": steps,
            "sched.name": "constant",
            "sched.warmup_iters": steps // 2,
            "sched.warmup_factor": 0.01,
            "progress": False,
            "log_every": 10**6,
        }
    )
    train_data = build_data(cfg.data, seed=seed, progress=False) if steps else None
    models = []
    jobs = [(d, *t) for d in depths for t in twins(d)]
    for depth, name, args, residual in tqdm(jobs, desc="models", disable=not progress, leave=False):
        torch.manual_seed(seed)
        model = create_model(
            name,
            num_classes=int(y.max()) + 1 if train_data is None else len(train_data.classes),
            in_chans=x.shape[1],
            **args,
        )
        row: dict[str, Any] = {
            "name": f"{'resnet' if residual else 'plain'}{depth}",
            "depth": depth,
            "residual": residual,
            "init": conv_grad_norms(model, x, y),
        }
        if correlation:
            row["correlation"] = gradient_correlation(model, x[0], seed=seed)
        if steps:
            opt, state, budget = build_optimizer(model, cfg), TrainState(), Budget(steps, batch)
            while not budget.done(state):
                train_data.train.set_epoch(state.epoch)
                train_one_epoch(
                    model, train_data.train, opt, state, cfg, budget=budget, device=torch.device("cpu")
                )
                state.epoch, state.step, state.epoch_samples = state.epoch + 1, 0, 0
            row["trained"] = conv_grad_norms(model, x, y)
        for key in ("init", "trained"):
            if key in row:
                norms = [v for _, v in row[key]]
                row[f"{key}_first_last_ratio"] = norms[0] / max(norms[-1], 1e-30)
        models.append(row)
    _plot(models, out / "gradient_norms.png", steps)
    if correlation:
        _plot_correlation(models, out / "gradient_correlation.png")
    (out / "gradient_norms.json").write_text(json.dumps(models, indent=1))
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
