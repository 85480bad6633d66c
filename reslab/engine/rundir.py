"""A run's directory: its header (config, command, code version), metrics (CSV, JSON lines,
TensorBoard), the console lines, the curves and the summary."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from reslab import __version__
from reslab.config import TrainConfig, json_text, save_config

EPOCH_COLUMNS = (
    "epoch",
    "iteration",
    "train_loss",
    "train_err",
    "eval_loss",
    "eval_err",
    "eval_top5_err",
    "ema_eval_err",
    "lr",
    "epoch_time_s",
    "img_s",
)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend. Imported when a plot is drawn: matplotlib
    adds about half a second to every start of the command line otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def default_run_dir(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.model}-{cfg.data.name}-{stamp}"


def code_version() -> str:
    """reslab's version and, in a git checkout, its commit (``+dirty`` with local changes)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()

    try:
        commit, dirty = (
            git("rev-parse", "--short", "HEAD"),
            git("status", "--porcelain", "--untracked-files=no"),
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"reslab {__version__}" + (f" (git {commit}{'+dirty' if dirty else ''})" if commit else "")


def write_header(
    run_dir: Path, cfg: TrainConfig, settings: dict[str, Any], policy: dict[str, Any] | None = None
) -> None:
    """``config.yaml`` (the config the run uses, its "auto" settings resolved for this device),
    ``policy.yaml`` (how it trains beyond plain training, e.g. fine-tuning) and a line in
    ``command.txt`` (command, directory, code version, device)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    if policy is not None:
        save_config(policy, run_dir / "policy.yaml")
    with open(run_dir / "command.txt", "a") as f:
        f.write(
            f"{datetime.now().isoformat(timespec='seconds')}  {' '.join(sys.argv)}\n"
            f"  cwd {os.getcwd()}; {settings['code_version']}; torch {torch.__version__}; "
            f"device {settings['device']} ({settings['device_name']}); world {settings['world']}\n"
        )


class RunLog:
    """Appends metric rows to ``metrics.jsonl`` (every row), ``metrics.csv`` (epoch rows) and TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.dir = run_dir
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.tb = SummaryWriter(str(run_dir / "tensorboard")) if tensorboard else None

    def truncate_after(self, iteration: int) -> None:
        """Drop rows written after ``iteration`` (a resumed run rewrites them identically)."""
        if self.jsonl.exists():
            rows = [r for r in read_metrics(self.dir) if r["iteration"] <= iteration]
            self.jsonl.write_text("".join(json_text(r, None) + "\n" for r in rows))
            epochs = [r for r in rows if r["kind"] == "epoch"]
            self._write_csv(epochs)

    def _write_csv(self, rows: list[dict[str, Any]]) -> None:
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=EPOCH_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def log(self, row: dict[str, Any]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json_text(row, None) + "\n")
        if row["kind"] == "epoch":
            new = not self.csv.exists()
            with open(self.csv, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=EPOCH_COLUMNS, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow(row)
        if self.tb is not None:
            prefix = "epoch" if row["kind"] == "epoch" else "iter"
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("iteration", "epoch") and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", v, row["iteration"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def epoch_line(row: dict[str, Any], total_epochs: int | None, split: str) -> str:
    """The one-line summary printed after each epoch."""
    ep = f"epoch {row['epoch']}" + (f"/{total_epochs}" if total_epochs else "")
    parts = [ep, f"train loss {row['train_loss']:.4f} err {100 * row['train_err']:.2f}%"]
    if row.get("eval_err") is not None:
        parts.append(f"{split} loss {row['eval_loss']:.4f} err {100 * row['eval_err']:.2f}%")
    if row.get("ema_eval_err") is not None:
        parts.append(f"ema err {100 * row['ema_eval_err']:.2f}%")
    parts.append(f"lr {row['lr']:.4g}")
    parts.append(f"{row['epoch_time_s']:.1f}s ({row['img_s']:.0f} img/s)")
    return " | ".join(parts)


def plot_curves(run_dir: Path, title: str | None = None, split: str = "test") -> Path | None:
    """``curves.png``: error and loss against iterations, styled like the paper's Fig. 6.

    Thin lines: training error (averaged over logging intervals); bold lines: evaluation error.
    """
    rows = read_metrics(run_dir)
    iters = [r for r in rows if r["kind"] == "iter"]
    epochs = [r for r in rows if r["kind"] in ("epoch", "eval") and r.get("eval_err") is not None]
    if not iters and not epochs:
        return None
    plt = pyplot()
    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    if iters:
        x = [r["iteration"] for r in iters]
        ax_err.plot(x, [100 * r["train_err"] for r in iters], lw=0.8, color="C0", label="train error")
        ax_loss.plot(x, [r["train_loss"] for r in iters], lw=0.8, color="C0", label="train loss")
    if epochs:
        x = [r["iteration"] for r in epochs]
        ax_err.plot(x, [100 * r["eval_err"] for r in epochs], lw=2.2, color="C0", label=f"{split} error")
        ax_loss.plot(x, [r["eval_loss"] for r in epochs], lw=2.2, color="C0", label=f"{split} loss")
    ax_err.set_ylabel("error (%)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    for ax in (ax_err, ax_loss):
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
