"""Evaluation: loss, top-1/top-5 error and the confusion matrix, and their report (JSON + PNG)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reslab.config import json_text
from reslab.engine import distributed as dist
from reslab.engine.device import autocast
from reslab.engine.rundir import pyplot
from reslab.errors import ReslabError

TOPK = 5


class EvalStats:
    """Running loss, top-1/top-5 errors and confusion matrix of one model's outputs.

    Top-5 error is reported only with more than five classes: with five or fewer it is always 0.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.err1 = torch.zeros((), dtype=torch.float64, device=self.device)
        self.err5 = torch.zeros((), dtype=torch.float64, device=self.device)
        self.n = 0
        self.confusion: torch.Tensor | None = None

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        logits, y = logits.float().to(self.device), y.to(self.device)
        k = logits.shape[1]
        if self.confusion is None:
            self.confusion = torch.zeros(k, k, dtype=torch.int64, device=self.device)
        self.loss += F.cross_entropy(logits, y, reduction="sum").double()
        top = logits.topk(min(TOPK, k), dim=1).indices
        self.err1 += (top[:, 0] != y).sum()
        self.err5 += (~(top == y[:, None]).any(1)).sum()
        self.confusion += torch.bincount(y * k + top[:, 0], minlength=k * k).view(k, k)
        self.n += len(y)

    def result(self) -> dict[str, Any]:
        """Totals over all processes: with several ranks each sample counts exactly once."""
        if self.confusion is None:
            raise ReslabError("evaluation data is empty")
        loss, err1, err5, n = dist.all_reduce_sum(self.loss, self.err1, self.err5, self.n)
        return {
            "loss": loss / n,
            "err": err1 / n,
            "top5_err": err5 / n if self.confusion.shape[0] > TOPK else None,
            "n": int(n),
            "confusion": dist.all_reduce_tensor(self.confusion).cpu(),
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str | None = None,
    amp: str = "none",
) -> dict[str, Any]:
    """Loss, top-1/top-5 error and the confusion matrix over every (inputs, labels) batch: a
    loader or a list of batches."""
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stats = EvalStats(device)
    for x, y in batches:
        with autocast(device, amp):
            stats.add(model(x), y)
    return stats.result()


def eval_report(
    result: dict[str, Any], classes: list[str], out_dir: Path | None, title: str = ""
) -> dict[str, Any]:
    """Per-class accuracy and a confusion-matrix PNG (+ eval.json in ``out_dir``) from
    :func:`evaluate`'s result."""
    confusion = result["confusion"].double()
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    report = {
        "top1_err": result["err"],
        "top5_err": result["top5_err"],
        "loss": result["loss"],
        "n": result["n"],
        "per_class_acc": dict(zip(classes, per_class, strict=True)),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        report["confusion_png"] = str(
            plot_confusion(result["confusion"], classes, out_dir / "confusion.png", title)
        )
        (out_dir / "eval.json").write_text(json_text(report))
    return report


def plot_confusion(confusion: torch.Tensor, classes: list[str], path: Path, title: str = "") -> Path:
    plt = pyplot()
    k = len(classes)
    rows = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    size = min(16, 3 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), classes, rotation=90 if k > 10 else 45, ha="right" if k <= 10 else "center")
        ax.set_yticks(range(k), classes)
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    ax.text(
                        j,
                        i,
                        int(confusion[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if rows[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (row-normalised colours, counts in cells)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
