"""What every study shares: its output folder, summaries, plots, command-line arguments, lesions."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.config import NON_NEGATIVE, arg_type
from reslab.data import fixed_batches
from reslab.engine import Checkpoint, read_checkpoint, resolve_device
from reslab.engine.rundir import pyplot
from reslab.errors import ReslabError

__all__ = ["pyplot"]


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


# --- command-line arguments shared by the studies --------------------------------------------


def add_common_args(p: argparse.ArgumentParser, study: str, *, data: bool = True, seed: bool = True) -> None:
    p.add_argument("--out", metavar="DIR", help=f"study folder (default runs/analyze-{study})")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    if data:
        p.add_argument(
            "--data", help="default: the data the checkpoint was trained on (folder with --data-dir)"
        )
        p.add_argument("--data-dir", metavar="DIR")
    if seed:
        p.add_argument("--seed", type=arg_type(int, NON_NEGATIVE), default=0)


def add_checkpoint_args(p: argparse.ArgumentParser, help: str = "one or more checkpoints") -> None:
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT", help=help)
    p.add_argument("--model", help="architecture of bare state dicts (reslab checkpoints name their own)")


def run_from_args(
    run: Callable[..., dict[str, Any]], args: argparse.Namespace, *positional: Any
) -> dict[str, Any]:
    """Call a study's ``run`` with ``positional`` and the command-line values of its keyword
    parameters (each option's ``dest`` is the parameter's name)."""
    params = inspect.signature(run).parameters.values()
    keywords = {
        p.name: getattr(args, p.name) for p in params if p.kind is p.KEYWORD_ONLY and hasattr(args, p.name)
    }
    return run(*positional, **keywords)


def checkpoint_batches(
    ckpt: Checkpoint, split: str, limit: int, data: str | None = None, data_dir: str | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of real images for a checkpoint (see :func:`reslab.data.fixed_batches`), on its device."""
    device = next(ckpt.model.parameters()).device
    return fixed_batches(
        ckpt.config, ckpt.preprocess, split=split, limit=limit, data=data, data_dir=data_dir, device=device
    )


def load_checkpoints(args: argparse.Namespace) -> list[Checkpoint]:
    """The checkpoints a study was given, on its device."""
    device = resolve_device(args.device)
    return [read_checkpoint(path, args.model, device) for path in args.checkpoint]


def data_fields(data: str | None, data_dir: str | None) -> dict[str, Any]:
    """The data a study trains on: ``data``, or ``folder`` when only a folder is given, or the
    embedded default."""
    return {"name": data or ("folder" if data_dir else "default"), **({"dir": data_dir} if data_dir else {})}
