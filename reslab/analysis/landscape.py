"""Loss landscapes (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets").

The loss is evaluated at ``theta + a * d1 + b * d2`` for random directions ``d1, d2`` that are
*filter-normalised*: each filter of a direction is scaled to the norm of the matching filter of
the weights, so that the plot is comparable across networks and scale-invariant layers. BN
parameters and biases get zero directions. Evaluation uses a fixed subset of the training data
without augmentation. The grid is saved to NPZ after every row: an interrupted run resumes where
it stopped and ``replot`` redraws without recomputing.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from reslab.analysis.args import add_checkpoint_args, add_common_args
from reslab.analysis.inputs import (
    checkpoint_batches,
    checkpoint_data_identity,
    checkpoints_identity,
    load_checkpoints,
)
from reslab.analysis.output import checkpoint_label, finish, md_table, pyplot, study_dir, write_summary
from reslab.config import POSITIVE, Range, arg_type
from reslab.engine import Checkpoint, evaluate
from reslab.errors import ReslabError

HELP = "loss landscape along filter-normalised directions (Li et al. 2018)"


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """A random direction in weight space, one tensor per parameter, filter-wise normalised.

    A filter is a slice along the first (output) dimension. Parameters with one dimension (BN
    weights and biases, conv/linear biases) get zeros: moving them is not what the plot is about.
    """
    direction = []
    for p in model.parameters():
        if p.ndim <= 1:
            direction.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        w_norm = p.detach().flatten(1).norm(dim=1)
        d_norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)
        direction.append(d * (w_norm / d_norm).view(-1, *[1] * (p.ndim - 1)))
    return direction


@torch.no_grad()
def _set(
    model: nn.Module, base: list[torch.Tensor], dirs: list[list[torch.Tensor]], coefs: list[float]
) -> None:
    for i, p in enumerate(model.parameters()):
        value = base[i].clone()
        for d, c in zip(dirs, coefs, strict=True):
            value.add_(d[i], alpha=c)
        p.copy_(value)


def surface(
    model: nn.Module,
    batches,
    dirs: list[list[torch.Tensor]],
    coords: list[np.ndarray],
    npz: Path,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Loss and error over the grid spanned by ``coords`` along ``dirs`` (1 or 2 of them), resumable."""
    shape = tuple(len(c) for c in coords)
    loss, err = np.full(shape, np.nan), np.full(shape, np.nan)
    if npz.exists():
        saved = np.load(npz)
        if saved["loss"].shape == shape and all(np.allclose(saved[f"c{i}"], c) for i, c in enumerate(coords)):
            loss, err = saved["loss"], saved["err"]
    base = [p.detach().clone() for p in model.parameters()]
    todo = [idx for idx in np.ndindex(shape) if np.isnan(loss[idx])]
    try:
        for n, idx in enumerate(tqdm(todo, desc=npz.stem, unit="point", disable=not progress, leave=False)):
            _set(model, base, dirs, [float(coords[k][i]) for k, i in enumerate(idx)])
            result = evaluate(model, batches)
            err[idx], loss[idx] = result["err"], result["loss"]
            if n % max(1, shape[-1]) == shape[-1] - 1 or n == len(todo) - 1:
                _save(npz, loss, err, coords, extra)
    finally:
        _set(model, base, dirs, [0.0] * len(dirs))
        _save(npz, loss, err, coords, extra)
    return {"loss": loss, "err": err, **{f"c{i}": c for i, c in enumerate(coords)}}


def _save(npz: Path, loss, err, coords, extra) -> None:
    tmp = npz.with_name(npz.stem + ".tmp.npz")
    np.savez(
        tmp, loss=loss, err=err, **{f"c{i}": c for i, c in enumerate(coords)}, meta=json.dumps(extra or {})
    )
    tmp.replace(npz)


@torch.no_grad()
def interpolation(model_a: nn.Module, model_b: nn.Module, batches, ts: np.ndarray) -> dict[str, np.ndarray]:
    """Loss and error along ``(1 - t) * A + t * B`` (parameters and BN statistics alike)."""
    sa, sb = model_a.state_dict(), model_b.state_dict()
    probe = copy.deepcopy(model_a)
    loss, err = [], []
    for t in ts:
        probe.load_state_dict(
            {k: (1 - t) * v + t * sb[k] if v.dtype.is_floating_point else v for k, v in sa.items()}
        )
        result = evaluate(probe, batches)
        err.append(result["err"])
        loss.append(result["loss"])
    return {"t": ts, "loss": np.array(loss), "err": np.array(err)}


def run(
    checkpoints: list[Checkpoint],
    *,
    out: str | Path | None = None,
    grid: int = 21,
    span: float = 1.0,
    samples: int = 1000,
    mode: str = "both",
    interpolate: bool = False,
    replot: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    if grid < 3 or grid % 2 == 0:
        raise ReslabError(f"--grid {grid}: {GRID_RULE}")
    if interpolate and len(checkpoints) != 2:
        raise ReslabError("--interpolate needs exactly two checkpoints of the same architecture")
    identity = {
        "checkpoints": checkpoints_identity(checkpoints),
        "data": [checkpoint_data_identity(c) for c in checkpoints],
        "grid": grid,
        "span": span,
        "samples": samples,
        "mode": mode,
        "interpolate": interpolate,
        "seed": seed,
    }
    out = study_dir(out, "landscape", identity)
    coords = np.linspace(-span, span, grid)
    results = []

    for i, ckpt in enumerate(checkpoints):
        model = ckpt.model
        tag = f"{i}_{ckpt.arch}"
        batches = None if replot else checkpoint_batches(ckpt, "train", samples)
        g = torch.Generator().manual_seed(seed)
        d1, d2 = filter_normalized_direction(model, g), filter_normalized_direction(model, g)
        extra = {"checkpoint": ckpt.path, "arch": ckpt.arch, "samples": samples, "seed": seed}
        entry: dict[str, Any] = {"checkpoint": ckpt.path, "arch": ckpt.arch, "label": checkpoint_label(ckpt)}
        for kind, dirs, axes in (("1d", [d1], [coords]), ("2d", [d1, d2], [coords, coords])):
            if mode not in (kind, "both"):
                continue
            npz = out / f"landscape_{tag}_{kind}.npz"
            if replot:
                if not npz.exists():
                    raise ReslabError(f"{npz}: nothing to replot; run without --replot first")
                entry[kind] = dict(np.load(npz))
                missing = int(np.isnan(entry[kind]["loss"]).sum())
                if missing:  # an interrupted run: the grid resumes where it stopped
                    raise ReslabError(
                        f"{npz}: {missing} of {entry[kind]['loss'].size} grid points are not computed yet; "
                        "run without --replot to finish the grid"
                    )
            else:
                entry[kind] = surface(model, batches, dirs, axes, npz, progress, extra)
            entry[f"{kind}_npz"] = str(npz)
        centre = entry.get("1d") or entry.get("2d")
        c = grid // 2
        entry["loss_at_minimum"] = float(
            centre["loss"][c] if centre["loss"].ndim == 1 else centre["loss"][c, c]
        )
        entry["loss_at_edge"] = float(
            np.nanmean(centre["loss"][[0, -1]] if centre["loss"].ndim == 1 else centre["loss"][[0, -1], c])
        )
        results.append(entry)
    if interpolate:
        ts = np.linspace(-0.5, 1.5, 2 * grid - 1)
        curve = interpolation(
            checkpoints[0].model,
            checkpoints[1].model,
            checkpoint_batches(checkpoints[0], "train", samples),
            ts,
        )
        np.savez(out / "interpolation.npz", **curve)
        _plot_interpolation(curve, out / "interpolation.png", [r["label"] for r in results])
    _plot(results, out, span)
    rows = [
        {"label": r["label"], "loss_at_minimum": r["loss_at_minimum"], "loss_at_edge": r["loss_at_edge"]}
        for r in results
    ]
    md = [
        "# Loss landscape (Li et al. 2018)",
        "",
        f"Filter-normalised random directions, grid {grid}x{grid} over [-{span}, {span}], {samples} training "
        "images without augmentation; BN and bias directions are zero.",
        "",
        md_table(
            rows,
            [
                ("label", "checkpoint"),
                ("loss_at_minimum", "loss at the weights"),
                ("loss_at_edge", f"mean loss at +-{span} (1D)"),
            ],
        ),
        "",
        *(f"![{p.stem}]({p.name})" for p in sorted(out.glob("landscape*.png"))),
    ]
    if interpolate:
        md.append("![interpolation](interpolation.png)")
    summary = {
        "grid": grid,
        "span": span,
        "samples": samples,
        "checkpoints": [{k: v for k, v in r.items() if k not in ("1d", "2d")} for r in results],
    }
    write_summary(out, "landscape", summary, "\n".join(md))
    return {"out": str(out), **summary}


GRID_RULE = "an odd number of points per axis, at least 3: the centre point is the trained weights"


def _odd_grid(text: str) -> int:
    value = arg_type(int, Range(ge=3))(text)
    if value % 2 == 0:
        raise argparse.ArgumentTypeError(f"must be {GRID_RULE}, got {value}")
    return value


_odd_grid.constraint = Range(ge=3)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_args(p, "landscape")
    add_checkpoint_args(p, "one, or two side by side")
    p.add_argument(
        "--grid", type=_odd_grid, default=21, help="points per axis, odd (default 21; the paper: 51)"
    )
    p.add_argument(
        "--span", type=arg_type(float, POSITIVE), default=1.0, help="coordinates run over [-span, span]"
    )
    p.add_argument(
        "--samples", type=arg_type(int, POSITIVE), default=1000, help="training images (no augmentation)"
    )
    p.add_argument("--mode", choices=("1d", "2d", "both"), default="both")
    p.add_argument("--interpolate", action="store_true", help="also the 1D path between two checkpoints")
    p.add_argument("--replot", action="store_true", help="redraw from the saved NPZ files")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run(
        load_checkpoints(args.checkpoint, args.model, args.device),
        out=args.out,
        grid=args.grid,
        span=args.span,
        samples=args.samples,
        mode=args.mode,
        interpolate=args.interpolate,
        replot=args.replot,
        seed=args.seed,
        progress=args.progress,
    )


def _plot(results: list[dict[str, Any]], out: Path, span: float) -> None:
    plt = pyplot()
    if any("1d" in r for r in results):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, r in enumerate(r for r in results if "1d" in r):
            ax.plot(r["1d"]["c0"], r["1d"]["loss"], color=f"C{i}", label=r["label"])
        ax.set_yscale("log")
        ax.set_xlabel("step along a filter-normalised direction")
        ax.set_ylabel("training loss")
        finish(fig, out / "landscape_1d.png", ax)
    twod = [r for r in results if "2d" in r]
    if twod:
        fig, axes = plt.subplots(1, len(twod), figsize=(5.5 * len(twod), 4.8), squeeze=False)
        levels = np.logspace(
            np.log10(max(1e-3, np.nanmin([np.nanmin(r["2d"]["loss"]) for r in twod]))),
            np.log10(np.nanmax([np.nanmax(r["2d"]["loss"]) for r in twod])),
            30,
        )
        for ax, r in zip(axes[0], twod):
            grid = r["2d"]
            cs = ax.contour(grid["c0"], grid["c1"], grid["loss"].T, levels=levels, cmap="viridis")
            ax.clabel(cs, cs.levels[::6], fontsize=7, fmt="%.2g")
            ax.set_title(r["label"])
            ax.set_aspect("equal")
        fig.suptitle("training loss around the trained weights (same contour levels)")
        finish(fig, out / "landscape_2d.png")


def _plot_interpolation(curve: dict[str, np.ndarray], path: Path, labels: list[str]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve["t"], curve["loss"], color="C0", label="loss")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(curve["t"], 100 * curve["err"], color="C1", ls="--", label="error (%)")
    ax.set_xlabel(f"t: (1-t) {labels[0]} + t {labels[1]}")
    ax.set_ylabel("training loss")
    ax2.set_ylabel("training error (%)")
    finish(fig, path, ax)
