"""Layer responses (He et al. 2015, Fig. 7): the standard deviation of each 3x3 conv layer's output,
after BN and before the addition or ReLU. Residual functions are generally closer to zero than
plain layers, and deeper ResNets have smaller responses."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.analysis.args import add_checkpoint_args, add_common_args
from reslab.analysis.inputs import (
    checkpoint_batches,
    checkpoint_data_identity,
    checkpoints_identity,
    load_checkpoints,
)
from reslab.analysis.output import checkpoint_label, finish, md_table, pyplot, study_dir, write_summary
from reslab.config import POSITIVE, arg_type
from reslab.engine import Checkpoint

HELP = "std of each 3x3 layer's response on the test set (the paper's Fig. 7)"


@torch.no_grad()
def layer_response_stds(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[tuple[str, float]]:
    """Std of every 3x3 layer's response over all images, positions and channels, in depth order."""
    sums: dict[str, list[float]] = {}
    hooks = []
    names = {id(m): n for n, m in model.named_modules()}
    for block in model.blocks():
        for _, module in block.responses():
            name = names[id(module)]
            sums[name] = [0.0, 0.0, 0]

            def hook(_m, _i, out, name=name) -> None:
                o = out.double()
                acc = sums[name]
                acc[0] += o.sum().item()
                acc[1] += (o * o).sum().item()
                acc[2] += o.numel()

            hooks.append(module.register_forward_hook(hook))
    model.eval()
    try:
        for x, _ in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return [(name, max(0.0, s2 / n - (s / n) ** 2) ** 0.5) for name, (s, s2, n) in sums.items()]


def run(
    checkpoints: list[Checkpoint],
    *,
    out: str | Path | None = None,
    limit: int = 1000,
    data: str | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    identity = {
        "checkpoints": checkpoints_identity(checkpoints),
        "data": [checkpoint_data_identity(c, data, data_dir) for c in checkpoints],
        "limit": limit,
    }
    out = study_dir(out, "responses", identity)
    results = []
    for ckpt in checkpoints:
        batches = checkpoint_batches(ckpt, "test", limit, data, data_dir)
        stds = layer_response_stds(ckpt.model, batches)
        results.append(
            {
                "checkpoint": ckpt.path,
                "arch": ckpt.arch,
                "label": checkpoint_label(ckpt),
                "layers": stds,
                "mean_std": sum(s for _, s in stds) / len(stds),
                "images": sum(len(y) for _, y in batches),
            }
        )
    _plot(results, out / "responses.png")
    with open(out / "responses.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "arch", "layer_index", "layer", "std"])
        for r in results:
            for i, (name, s) in enumerate(r["layers"], 1):
                w.writerow([r["checkpoint"], r["arch"], i, name, s])
    rows = [{"label": r["label"], "layers": len(r["layers"]), "mean_std": r["mean_std"]} for r in results]
    md = [
        "# Layer responses (Fig. 7)",
        "",
        f"Std of each 3x3 layer's output after BN, before the addition/ReLU, over {results[0]['images']} test images.",
        "",
        md_table(rows, [("label", "checkpoint"), ("layers", "3x3 layers"), ("mean_std", "mean std")]),
        "",
        "![responses](responses.png)",
    ]
    summary = {
        "checkpoints": [
            {k: v for k, v in r.items() if k != "layers"} | {"stds": [s for _, s in r["layers"]]}
            for r in results
        ]
    }
    write_summary(out, "responses", summary, "\n".join(md))
    return {"out": str(out), **summary}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_args(p, "responses", data="the data the checkpoint was trained on", seed=False)
    add_checkpoint_args(p)
    p.add_argument("--limit", type=arg_type(int, POSITIVE), default=1000, help="test images to use")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run(
        load_checkpoints(args.checkpoint, args.model, args.device),
        out=args.out,
        limit=args.limit,
        data=args.data,
        data_dir=args.data_dir,
    )


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7))
    for i, r in enumerate(results):
        stds = [s for _, s in r["layers"]]
        top.plot(range(1, len(stds) + 1), stds, color=f"C{i}", label=r["label"], lw=1.2)
        bottom.plot(
            range(1, len(stds) + 1), sorted(stds, reverse=True), color=f"C{i}", label=r["label"], lw=1.2
        )
    top.set_xlabel("layer index (original order)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("std")
    finish(fig, path, top, bottom)
