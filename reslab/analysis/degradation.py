"""The degradation experiment (He et al. 2015, Figs. 1 and 6).

Plain and residual twins of several depths are trained with one recipe and seed. A deeper plain
network ends with *higher training error* (degradation, not overfitting); its residual twin does
not. ``quick`` trains a few hundred iterations on real data, enough to show both effects on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import itertools
from pathlib import Path
from typing import Any

from reslab.analysis.common import (
    add_common_args,
    data_fields,
    finish,
    md_table,
    pyplot,
    run_from_args,
    study_dir,
    write_summary,
)
from reslab.config import POSITIVE, arg_type, int_list, load_config
from reslab.engine import fit
from reslab.engine.rundir import read_metrics
from reslab.errors import ReslabError
from reslab.models import list_models

HELP = "train plain and residual twins at several depths (the paper's Figs. 1 and 6)"

# A few hundred iterations of the paper's recipe. Deep residual nets need a warm-up at this budget
# (the paper warms ResNet-110 up for 400 iterations); measured here: without it ResNet-56 is still
# unstable after 300 iterations.
QUICK = {
    "iters": 300,
    "data.batch_size": 128,
    "optim.lr": 0.1,
    "sched.name": "constant",
    "sched.warmup_iters": 150,
    "sched.warmup_mode": "linear",
    "sched.warmup_factor": 0.01,
    "log_every": 10,
    "eval_every_iters": 50,
    "data.limit_test": 2000,
}
TRAIN_TAIL = 50  # final training error: the mean over the last 50 iterations


def twins(depth: int) -> list[tuple[str, dict[str, Any], bool]]:
    """(model name, model_args, residual) of the plain and residual networks of ``depth`` layers."""
    residual, plain = f"resnet{depth}", f"plain{depth}"
    if residual not in list_models():
        known = sorted(int(n[5:]) for n in list_models("plain*"))
        raise ReslabError(
            f"no ResNet of depth {depth} to compare: the paper's CIFAR ResNets have 6n+2 layers "
            f"(20, 32, 44, 56, 110, 1202) and its ImageNet ones 18, 34, ...; depths with plain twins: "
            f"{', '.join(map(str, known))}"
        )
    plain_pair = (plain, {}, False) if plain in list_models() else (residual, {"shortcut": "none"}, False)
    return [plain_pair, (residual, {}, True)]


def run(
    depths: list[int],
    *,
    out: str | Path | None = None,
    quick: bool = False,
    recipe: str = "cifar10_paper",
    data: str | None = None,
    data_dir: str | None = None,
    iters: int | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str = "auto",
) -> dict[str, Any]:
    out = study_dir(out, "degradation")
    data_overrides = {f"data.{k}": v for k, v in data_fields(data, data_dir).items()}
    models = []
    for depth in depths:
        for name, args, residual in twins(depth):
            label = f"{'resnet' if residual else 'plain'}{depth}"
            run_dir = out / "runs" / label
            overrides = {
                **(QUICK if quick else {}),
                **data_overrides,
                "model": name,
                "model_args": args,
                "seed": seed,
                "progress": progress,
                "device": device,
                "out": str(run_dir),
            }
            if iters is not None:
                overrides["iters"] = iters
            if (run_dir / "summary.json").exists():
                pass  # already trained by an earlier (interrupted) study: reuse it
            elif (run_dir / "last.pt").exists():
                fit(load_config(overrides={"progress": progress, "device": device}), resume=run_dir)
            else:
                fit(load_config(None if quick else recipe, overrides))
            models.append(_model_row(label, depth, residual, run_dir))
    _plot(models, out / "degradation.png")
    _write_csv(models, out / "curves.csv")
    findings = _findings(models)
    summary = {"quick": quick, "depths": depths, "models": models, "findings": findings}
    md = [
        "# Degradation: plain vs residual networks",
        "",
        md_table(
            models,
            [
                ("name", "model"),
                ("depth", "depth"),
                ("residual", "residual"),
                ("train_error", "final train error"),
                ("test_error", "final test error"),
                ("iterations", "iterations"),
            ],
        ),
        "",
        *(f"- {k}: {v}" for k, v in findings.items()),
        "",
        "![degradation](degradation.png)",
    ]
    write_summary(out, "degradation", summary, "\n".join(md))
    return {"out": str(out), **summary}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_args(p, "degradation")
    p.add_argument(
        "--depths", type=int_list(POSITIVE), default=[20, 56], help="comma-separated (default 20,56)"
    )
    p.add_argument("--quick", action="store_true", help="a few hundred iterations: minutes on a CPU")
    p.add_argument(
        "--config",
        dest="recipe",
        default="cifar10_paper",
        help="recipe for full runs (default cifar10_paper)",
    )
    p.add_argument("--iters", type=arg_type(int, POSITIVE), help="override the budget")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run_from_args(run, args, args.depths)


def _model_row(label: str, depth: int, residual: bool, run_dir: Path) -> dict[str, Any]:
    rows = read_metrics(run_dir)
    iters = [r for r in rows if r["kind"] == "iter"]
    evals = [r for r in rows if r["kind"] in ("eval", "epoch") and r.get("eval_err") is not None]
    last = iters[-1]["iteration"] if iters else 0
    return {
        "name": label,
        "depth": depth,
        "residual": residual,
        "train_error": tail_mean(iters, TRAIN_TAIL),
        "test_error": evals[-1]["eval_err"] if evals else None,
        "iterations": last,
        "run_dir": str(run_dir),
        "curve": {
            "train": [(r["iteration"], r["train_err"]) for r in iters],
            "test": [(r["iteration"], r["eval_err"]) for r in evals],
        },
    }


def tail_mean(rows: list[dict[str, Any]], window: int) -> float | None:
    """Mean training error over the last ``window`` iterations (rows average their logging interval)."""
    if not rows:
        return None
    last = rows[-1]["iteration"]
    starts = [0] + [r["iteration"] for r in rows[:-1]]
    parts = [
        (r["train_err"], r["iteration"] - s) for r, s in zip(rows, starts) if r["iteration"] > last - window
    ]
    return sum(e * w for e, w in parts) / sum(w for _, w in parts)


def _findings(models: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(m["depth"], m["residual"]): m for m in models}
    depths = sorted({m["depth"] for m in models})
    found = {}
    for shallow, deep in itertools.pairwise(depths):
        found[f"plain{deep} trains worse than plain{shallow}"] = (
            by[deep, False]["train_error"] > by[shallow, False]["train_error"]
        )
        found[f"resnet{deep} trains better than plain{deep}"] = (
            by[deep, True]["train_error"] < by[deep, False]["train_error"]
        )
    return found


def _plot(models: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    depths = sorted({m["depth"] for m in models})
    for ax, residual in zip(axes, (False, True)):
        for i, depth in enumerate(depths):
            m = next(m for m in models if m["depth"] == depth and m["residual"] == residual)
            color = f"C{i}"
            if m["curve"]["train"]:
                x, y = zip(*m["curve"]["train"])
                ax.plot(x, [100 * v for v in y], lw=0.8, ls="--", color=color)
            if m["curve"]["test"]:
                x, y = zip(*m["curve"]["test"])
                ax.plot(x, [100 * v for v in y], lw=2.2, color=color, label=f"{m['name']}")
        ax.set_title(("ResNet" if residual else "plain") + " (dashed: train error, bold: test error)")
        ax.set_xlabel("iterations")
    axes[0].set_ylabel("error (%)")
    finish(fig, path, *axes)


def _write_csv(models: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "depth", "residual", "kind", "iteration", "error"])
        for m in models:
            for kind in ("train", "test"):
                for it, err in m["curve"][kind]:
                    w.writerow([m["name"], m["depth"], m["residual"], kind, it, err])
