"""Lesion study (Veit et al. 2016, "Residual Networks Behave Like Ensembles of Relatively Shallow
Networks"): remove blocks at test time and watch the error. Deleting one block of a ResNet barely
matters and the error grows smoothly with the number deleted; deleting one layer of a plain net
collapses it. A ResNet of n blocks holds 2^n paths whose lengths are Binomial(n, 1/2)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

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
from reslab.config import NON_NEGATIVE, POSITIVE, arg_type
from reslab.engine import Checkpoint, evaluate
from reslab.errors import ReslabError

HELP = "remove residual blocks at test time (Veit et al. 2016)"


def removable_blocks(model) -> list[int]:
    """Blocks (depth-order indices) whose input and output shapes agree: they can become identity."""
    return [i for i, b in enumerate(model.blocks()) if b.keeps_shape]


def path_lengths(n: int) -> list[float]:
    """The share of the 2^n paths through n residual blocks that pass through k branches, k = 0..n."""
    return [math.comb(n, k) / 2**n for k in range(n + 1)]


def _error_rate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return evaluate(model, batches)["err"]


@contextlib.contextmanager
def lesioned(model: nn.Module, blocks: Sequence[int]) -> Iterator[nn.Module]:
    """Temporarily replace the given blocks (indices in depth order) by identity."""
    stages = [getattr(model, s) for s in model.stage_names]
    places = [(stage, i) for stage in stages for i in range(len(stage))]
    saved = []
    for b in blocks:
        stage, i = places[b]
        if not getattr(stage[i], "keeps_shape", True):
            raise ReslabError(f"block {b} changes the shape of its input and cannot be removed")
        saved.append((stage, i, stage[i]))
        stage[i] = nn.Identity()
    try:
        yield model
    finally:
        for stage, i, block in saved:
            stage[i] = block


def run(
    checkpoints: list[Checkpoint],
    *,
    out: str | Path | None = None,
    limit: int = 2000,
    draws: int = 5,
    max_k: int = 10,
    seed: int = 0,
    data: str | None = None,
    data_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    identity = {
        "checkpoints": checkpoints_identity(checkpoints),
        "data": [checkpoint_data_identity(c, data, data_dir) for c in checkpoints],
        "limit": limit,
        "draws": draws,
        "max_k": max_k,
        "seed": seed,
    }
    out = study_dir(out, "lesion", identity)
    results = []
    for ckpt in checkpoints:
        model, arch = ckpt.model, ckpt.arch
        batches = checkpoint_batches(ckpt, "test", limit, data, data_dir)
        error = partial(_error_rate, model, batches)
        base = error()
        blocks = model.blocks()
        ok = removable_blocks(model)
        single = []
        for i in tqdm(range(len(blocks)), desc=f"{arch}: one block", disable=not progress, leave=False):
            if i in ok:
                with lesioned(model, [i]):
                    single.append({"block": i, "error": error()})
            else:
                single.append({"block": i, "error": None, "note": "changes shape: not removable"})
        g = torch.Generator().manual_seed(seed)
        k_curve = []
        for k in tqdm(
            range(1, min(max_k, len(ok)) + 1), desc=f"{arch}: k blocks", disable=not progress, leave=False
        ):
            errs = []
            for _ in range(draws):
                pick = [ok[j] for j in torch.randperm(len(ok), generator=g)[:k].tolist()]
                with lesioned(model, pick):
                    errs.append(error())
            mean = sum(errs) / len(errs)
            k_curve.append(
                {
                    "k": k,
                    "mean_error": mean,
                    "std_error": (sum((e - mean) ** 2 for e in errs) / len(errs)) ** 0.5,
                    "errors": errs,
                }
            )
        removable_errors = [s["error"] for s in single if s["error"] is not None]
        results.append(
            {
                "checkpoint": ckpt.path,
                "arch": arch,
                "residual": model.spec.residual,
                "label": checkpoint_label(ckpt),
                "base_error": base,
                "blocks": len(blocks),
                "removable": len(ok),
                "single": single,
                "k_curve": k_curve,
                "mean_single_error": sum(removable_errors) / max(1, len(removable_errors)),
                "images": sum(len(y) for _, y in batches),
            }
        )
    _plot(results, out)
    with open(out / "lesion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "arch", "kind", "block_or_k", "error", "std"])
        for r in results:
            for s in r["single"]:
                w.writerow([r["checkpoint"], r["arch"], "single", s["block"], s["error"], ""])
            for c in r["k_curve"]:
                w.writerow([r["checkpoint"], r["arch"], "random_k", c["k"], c["mean_error"], c["std_error"]])
    rows = []
    for r in results:
        row = {"label": r["label"], "base": r["base_error"], "one": r["mean_single_error"]}
        for k in (1, 5, 10):
            c = next((c for c in r["k_curve"] if c["k"] == k), None)
            row[f"k{k}"] = c["mean_error"] if c else None
        rows.append(row)
    md = [
        "# Lesion study (Veit et al. 2016)",
        "",
        f"Test error on {results[0]['images']} test images after removing residual blocks at test time "
        f"({draws} random draws per k).",
        "",
        md_table(
            rows,
            [
                ("label", "checkpoint"),
                ("base", "intact"),
                ("one", "one block (mean)"),
                ("k1", "1 random"),
                ("k5", "5 random"),
                ("k10", "10 random"),
            ],
        ),
        "",
        "![lesion](lesion.png)",
        "![path lengths](path_lengths.png)",
    ]
    summary = {"limit": limit, "draws": draws, "checkpoints": results}
    write_summary(out, "lesion", summary, "\n".join(md))
    return {"out": str(out), **summary}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_args(p, "lesion", data="the data the checkpoint was trained on")
    add_checkpoint_args(p)
    p.add_argument("--limit", type=arg_type(int, POSITIVE), default=2000, help="test images to use")
    p.add_argument(
        "--draws", type=arg_type(int, POSITIVE), default=5, help="random draws per number of removed blocks"
    )
    p.add_argument(
        "--max-k",
        type=arg_type(int, NON_NEGATIVE),
        default=10,
        help="remove up to this many blocks at random",
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run(
        load_checkpoints(args.checkpoint, args.model, args.device),
        out=args.out,
        limit=args.limit,
        draws=args.draws,
        max_k=args.max_k,
        seed=args.seed,
        data=args.data,
        data_dir=args.data_dir,
        progress=args.progress,
    )


def _plot(results: list[dict[str, Any]], out: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(results):
        xs = [s["block"] for s in r["single"] if s["error"] is not None]
        ys = [100 * s["error"] for s in r["single"] if s["error"] is not None]
        left.plot(xs, ys, "o-", color=f"C{i}", ms=3, label=r["label"])
        left.axhline(100 * r["base_error"], color=f"C{i}", ls=":", lw=1)
        ks = [c["k"] for c in r["k_curve"]]
        means = [100 * c["mean_error"] for c in r["k_curve"]]
        stds = [100 * c["std_error"] for c in r["k_curve"]]
        right.errorbar(
            [0, *ks],
            [100 * r["base_error"], *means],
            yerr=[0, *stds],
            color=f"C{i}",
            capsize=3,
            label=r["label"],
        )
    left.set_xlabel("removed block (depth order)")
    left.set_ylabel("test error (%)")
    left.set_title("removing one block (dotted: intact)")
    right.set_xlabel("number of blocks removed at random")
    right.set_ylabel("test error (%)")
    right.set_title("removing k blocks")
    finish(fig, out / "lesion.png", left, right)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(x for x in results if x["residual"]):
        dist = path_lengths(r["blocks"])
        ax.bar(
            [k + 0.25 * i for k in range(len(dist))],
            dist,
            width=0.25,
            color=f"C{i}",
            label=f"{r['label']}: {r['blocks']} blocks, 2^{r['blocks']} paths",
        )
    ax.set_xlabel("path length (residual branches passed)")
    ax.set_ylabel("share of paths")
    ax.set_title("path lengths: Binomial(n, 1/2)")
    finish(fig, out / "path_lengths.png", ax)
