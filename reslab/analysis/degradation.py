"""The degradation experiment (He et al. 2015, Figs. 1 and 6, and Table 6).

Plain and residual twins of several depths are trained with one recipe and seed. A deeper plain
network ends with *higher training error* (degradation, not overfitting); its residual twin does
not. ``quick`` trains a few hundred iterations on real data, enough to show both effects on a CPU.
``paper`` is the paper's whole CIFAR-10 study in one command: plain-20/32/44/56 and
ResNet-20/32/44/56/110 on the paper's recipe, several runs at once (``jobs`` processes sharing
the device), each a normal, resumable run directory, summarised against the paper's Table 6.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
from pathlib import Path
from typing import Any

import yaml

from reslab.analysis.args import add_common_args
from reslab.analysis.inputs import data_fields, data_identity
from reslab.analysis.output import finish, md_table, pyplot, study_dir, write_summary
from reslab.analysis.report import build_report
from reslab.analysis.runner import PlannedRun, jobs_arg, train_runs
from reslab.config import POSITIVE, arg_type, int_list, load_config, resolve_recipe
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

# The paper's study: ResNets of these depths, plain twins up to 56 layers (Fig. 6 left).
PAPER_DEPTHS = (20, 32, 44, 56, 110)
PAPER_PLAIN_MAX = 56
# Table 6, test error in %: the paper's (ResNet-110: its best of 5 runs; mean 6.61 +- 0.16) and the
# widely used PyTorch reproduction's (akamaster/pytorch_resnet_cifar10).
PAPER_TEST_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
REPRODUCTION_TEST_ERROR = {20: 8.27, 32: 7.37, 44: 6.90, 56: 6.61, 110: 6.32}


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
    paper: bool = False,
    recipe: str = "cifar10_paper",
    data: str | None = None,
    data_dir: str | None = None,
    iters: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str = "auto",
    jobs: int | str | None = None,
) -> dict[str, Any]:
    """Train the twins of each depth (only the ResNet above 56 layers with ``paper``) and compare
    them. Runs already finished are reused and interrupted ones resumed, so a study can be
    restarted. ``jobs`` > 1 trains that many at once, as separate processes; ``auto`` (the
    default) as many as measurably fill a GPU, one at a time on CPUs. The summary has the study's
    wall time (``wall_s``) and each run's training speed (``img_s``)."""
    if paper and quick:
        raise ReslabError(
            "--paper trains the paper's schedule; drop --quick (or drop --paper for a quick look)"
        )
    if paper and not (data or data_dir):
        raise ReslabError("--paper trains on CIFAR-10: pass --data-dir DIR (class folders train/ and test/)")
    jobs = jobs or "auto"
    fields = data_fields(data, data_dir)
    if fields.get("dir"):
        fields["dir"] = str(Path(fields["dir"]).resolve())
    identity = {
        "depths": depths,
        "quick": quick,
        "paper": paper,
        "recipe": None if quick else resolve_recipe(recipe).read_text(),
        "iters": iters,
        "batch_size": batch_size,
        "seed": seed,
        "data": data_identity(fields),
    }
    out = study_dir(out, "degradation", identity)
    data_overrides = {f"data.{k}": v for k, v in fields.items()}
    runs, rows = [], []
    for depth in depths:
        for name, args, residual in twins(depth):
            if paper and not residual and depth > PAPER_PLAIN_MAX:
                continue
            label = f"{'resnet' if residual else 'plain'}{depth}"
            overrides = {
                **(QUICK if quick else {}),
                **data_overrides,
                "model": name,
                "model_args": args,
                "seed": seed,
                "device": device,
                "out": str(out / "runs" / label),
                **({"iters": iters} if iters is not None else {}),
                **({"data.batch_size": batch_size} if batch_size is not None else {}),
            }
            runs.append(PlannedRun(label, load_config(None if quick else recipe, overrides)))
            rows.append((label, depth, residual))
    packed = train_runs(runs, jobs, progress)
    models = [_model_row(*row, run.run_dir) for row, run in zip(rows, runs, strict=True)]
    _plot(models, out / "degradation.png")
    _write_csv(models, out / "curves.csv")
    findings = _findings(models)
    summary = {
        "quick": quick,
        "paper": paper,
        "depths": depths,
        "wall_s": packed["wall_s"],
        "jobs": packed["jobs"],
        "models": models,
        "findings": findings,
    }
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
                ("img_s", "img/s"),
            ],
        ),
        "",
        f"Trained in {packed['wall_s'] / 60:.1f} min of wall time, {packed['jobs']} run(s) at a time "
        "(this call: runs an earlier call finished are reused).",
        "",
        *(f"- {k}: {v}" for k, v in findings.items()),
        "",
        *(_table6(models) if paper else []),
        "![degradation](degradation.png)",
    ]
    write_summary(out, "degradation", summary, "\n".join(md))
    build_report([str(out)], out / "summary.html")
    return {"out": str(out), **summary}


def _table6(models: list[dict[str, Any]]) -> list[str]:
    """The paper's Table 6 (CIFAR-10 test error, %) beside this study's."""

    def pct(v: float | None) -> str | None:
        return None if v is None else f"{v:.2f}"

    rows = []
    for m in models:
        ours = 100 * m["test_error"] if m["test_error"] is not None else None
        paper = PAPER_TEST_ERROR.get(m["depth"]) if m["residual"] else None
        rows.append(
            {
                "model": m["name"],
                "ours": pct(ours),
                "paper": pct(paper),
                "reproduction": pct(REPRODUCTION_TEST_ERROR.get(m["depth"]) if m["residual"] else None),
                "vs_paper": f"{ours - paper:+.2f}" if ours is not None and paper else None,
            }
        )
    columns = [("model", "model"), ("ours", "test error % (reslab)"), ("paper", "paper (Table 6)")]
    columns += [("reproduction", "PyTorch reproduction"), ("vs_paper", "reslab - paper (points)")]
    return ["## Table 6: CIFAR-10 test error", "", md_table(rows, columns), ""]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_args(
        p, "degradation", data="the embedded MNIST sample (--paper: pass --data-dir with CIFAR-10)"
    )
    p.add_argument(
        "--depths",
        type=int_list(POSITIVE),
        help="comma-separated (default 20,56; with --paper 20,32,44,56,110)",
    )
    p.add_argument("--quick", action="store_true", help="a few hundred iterations: minutes on a CPU")
    p.add_argument(
        "--config",
        dest="recipe",
        default="cifar10_paper",
        help="recipe for full runs (default cifar10_paper)",
    )
    p.add_argument("--iters", type=arg_type(int, POSITIVE), help="override the budget")
    p.add_argument("--batch-size", type=arg_type(int, POSITIVE), help="override the recipe's batch size")
    p.add_argument(
        "--paper",
        action="store_true",
        help="the paper's CIFAR-10 study: plain-20..56 and ResNet-20..110 on its recipe, with Table 6",
    )
    p.add_argument(
        "--jobs",
        type=jobs_arg,
        default="auto",
        help="runs trained at once, or auto (default): as many as measurably fill a GPU, one on CPUs",
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run(
        args.depths or (list(PAPER_DEPTHS) if args.paper else [20, 56]),
        out=args.out,
        quick=args.quick,
        paper=args.paper,
        recipe=args.recipe,
        data=args.data,
        data_dir=args.data_dir,
        iters=args.iters,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=args.progress,
        device=args.device,
        jobs=args.jobs,
    )


def _model_row(label: str, depth: int, residual: bool, run_dir: Path) -> dict[str, Any]:
    rows = read_metrics(run_dir)
    iters = [r for r in rows if r["kind"] == "iter"]
    evals = [r for r in rows if r["kind"] in ("eval", "epoch") and r.get("eval_err") is not None]
    last = iters[-1]["iteration"] if iters else 0
    summary = (
        json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    )
    seconds = summary.get("train_seconds")
    batch = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("data", {}).get("batch_size", 0)
    return {
        "name": label,
        "depth": depth,
        "residual": residual,
        "train_error": tail_mean(iters, TRAIN_TAIL),
        "test_error": evals[-1]["eval_err"] if evals else None,
        "iterations": last,
        "img_s": round(last * batch / seconds)
        if seconds
        else None,  # training speed, on its share of the device
        "train_seconds": seconds,
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
    """Figure 6's observations, checked: training error rises with depth for plain nets and not for
    their residual twins."""
    by = {(m["depth"], m["residual"]): m for m in models}
    found = {}
    for residual in (False, True):
        kind = "resnet" if residual else "plain"
        depths = sorted(d for d, r in by if r == residual)
        for shallow, deep in itertools.pairwise(depths):
            worse = by[deep, residual]["train_error"] > by[shallow, residual]["train_error"]
            found[f"{kind}{deep} trains worse than {kind}{shallow}"] = worse
    for depth in sorted(d for d, r in by if not r and (d, True) in by):
        found[f"resnet{depth} trains better than plain{depth}"] = (
            by[depth, True]["train_error"] < by[depth, False]["train_error"]
        )
    return found


def _plot(models: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    depths = sorted({m["depth"] for m in models})
    for ax, residual in zip(axes, (False, True)):
        for i, depth in enumerate(depths):
            m = next((m for m in models if m["depth"] == depth and m["residual"] == residual), None)
            if m is None:  # the paper's study has no plain-110
                continue
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
