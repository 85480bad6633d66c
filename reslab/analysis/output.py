"""Where a study's results go: its folder, ``summary.json`` + ``summary.md``, tables and plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reslab.engine import Checkpoint
from reslab.engine.rundir import pyplot

__all__ = ["checkpoint_label", "finish", "md_table", "pyplot", "study_dir", "write_summary"]


def study_dir(out: str | Path | None, study: str) -> Path:
    path = Path(out) if out else Path("runs") / f"analyze-{study}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint_label(ckpt: Checkpoint) -> str:
    """How plots and tables name a checkpoint: its architecture and ``run/file`` (two checkpoints of
    one run, e.g. ``best.pt`` and ``last.pt``, stay apart)."""
    path = Path(ckpt.path)
    return f"{ckpt.arch} ({path.parent.name}/{path.name})"


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


def finish(fig, path: Path, *axes) -> None:
    """Grid and legend on ``axes``, then write ``fig`` to ``path`` as PNG and free it."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
