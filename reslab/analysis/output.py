"""Where a study's results go: its folder, ``summary.json`` + ``summary.md``, tables and plots."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reslab.config import json_text
from reslab.engine import Checkpoint
from reslab.engine.rundir import pyplot
from reslab.errors import ReslabError

__all__ = ["checkpoint_label", "finish", "md_table", "pyplot", "study_dir", "write_summary"]


STUDY_RECORD = "study.json"


def study_dir(out: str | Path | None, study: str, identity: dict[str, Any]) -> Path:
    """A study's folder, and the promise that what is in it was computed for this study.

    ``identity`` is everything that determines the results (checkpoint contents, options, data);
    its fingerprint is recorded in ``study.json``. By default each study gets its own folder,
    ``runs/analyze-STUDY-FINGERPRINT``; a folder holding a study of other inputs is refused (its
    results are never mixed with, nor replaced by, another study's), the same study's is reused."""
    fingerprint = hashlib.sha256(json_text(identity, None).encode()).hexdigest()[:12]
    path = Path(out) if out else Path("runs") / f"analyze-{study}-{fingerprint[:8]}"
    record = path / STUDY_RECORD
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("fingerprint") != fingerprint:
            old = saved.get("identity", {})
            differ = sorted(k for k in {*old, *identity} if old.get(k) != identity.get(k))
            raise ReslabError(
                f"{path} holds a {saved.get('study', 'different')} study of other inputs ({', '.join(differ) or 'another version'} "
                "differ); choose another --out, or delete that folder to replace it"
            )
    elif path.is_dir() and any(path.iterdir()):
        raise ReslabError(f"{path} is not empty and holds no reslab study; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    record.write_text(json_text({"study": study, "fingerprint": fingerprint, "identity": identity}))
    return path


def checkpoint_label(ckpt: Checkpoint) -> str:
    """How plots and tables name a checkpoint: its architecture and ``run/file`` (two checkpoints of
    one run, e.g. ``best.pt`` and ``last.pt``, stay apart)."""
    path = Path(ckpt.path)
    return f"{ckpt.arch} ({path.parent.name}/{path.name})"


def write_summary(out: Path, study: str, summary: dict[str, Any], markdown: str) -> None:
    """``summary.json`` (the numbers) and ``summary.md`` (a short human summary) of a study."""
    (out / "summary.json").write_text(json_text({"study": study, **summary}))
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
