"""What every study shares: its output folder, summaries, a fixed real-data subset, and lesions."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.errors import ReslabError


def study_dir(out: str | Path | None, study: str) -> Path:
    path = Path(out) if out else Path("runs") / f"analyze-{study}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint_label(path: str | Path, meta: dict[str, Any]) -> str:
    """How plots and tables name a checkpoint: its architecture and ``run/file`` (two checkpoints of
    one run, e.g. ``best.pt`` and ``last.pt``, stay apart)."""
    path = Path(path)
    return f"{meta['arch']} ({path.parent.name}/{path.name})"


def write_summary(out: Path, study: str, summary: dict[str, Any], markdown: str) -> None:
    """``summary.json`` (the numbers) and ``summary.md`` (a short human summary) of a study."""
    (out / "summary.json").write_text(json.dumps({"study": study, **summary}, indent=1, default=float))
    (out / "summary.md").write_text(markdown.rstrip() + "\n")


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish(fig, path: Path, *axes) -> None:
    """Grid and legend on ``axes``, then write ``fig`` to ``path`` as PNG and free it."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


@torch.no_grad()
def error_and_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    model.eval()
    wrong, loss, n = 0, 0.0, 0
    for x, y in batches:
        out = model(x)
        wrong += (out.argmax(1) != y).sum().item()
        loss += torch.nn.functional.cross_entropy(out, y, reduction="sum").item()
        n += len(y)
    return wrong / n, loss / n


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
