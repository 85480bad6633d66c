"""A record is a mean over seeds, never a lucky run: train one recipe with N seeds and report the
mean and standard deviation of the test error and of the training time.

The seeds train packed onto the device as the degradation study's runs do (one run directory
each, resumable); ``tta="flip"`` also evaluates each final model with test-time flips. The
summary names the device, so a record row says where it was measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from reslab.analysis.args import add_common_args
from reslab.analysis.degradation import PAPER_TEST_ERROR
from reslab.analysis.inputs import data_fields, data_identity
from reslab.analysis.output import finish, md_table, pyplot, study_dir, write_summary
from reslab.analysis.runner import PlannedRun, jobs_arg, train_runs
from reslab.config import (
    POSITIVE,
    TTAMode,
    arg_type,
    choices,
    load_config,
    one_budget,
    parse_override,
    resolve_recipe,
)
from reslab.engine.checkpoint import LAST
from reslab.inference import evaluate_checkpoints

HELP = "train one recipe with several seeds: mean and std of test error and training time (records)"


def run(
    recipe: str,
    *,
    model: str | None = None,
    seeds: int = 5,
    out: str | Path | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    tta: str | None = None,
    jobs: int | str = "auto",
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``recipe`` (with ``model`` and ``overrides``) once per seed 0..``seeds``-1 and
    summarise: each seed's test error (and with ``tta``), training seconds and speed; their mean
    and sample standard deviation."""
    fields = data_fields(data, data_dir) if (data or data_dir) else {}
    if fields.get("dir"):
        fields["dir"] = str(Path(fields["dir"]).resolve())
    base = {
        **(overrides or {}),
        **({"model": model} if model else {}),
        **{f"data.{k}": v for k, v in fields.items()},
    }
    probe = load_config(recipe, {**base, "device": device})
    identity = {
        "recipe": resolve_recipe(recipe).read_text(),
        "overrides": base,
        "seeds": seeds,
        "tta": tta,
        "data": data_identity(
            {"name": probe.data.name, **({"dir": probe.data.dir} if probe.data.dir else {})}
        ),
    }
    out = study_dir(out, "reproduce", identity)
    runs = [
        PlannedRun(
            f"seed{seed}",
            load_config(
                recipe, {**base, "seed": seed, "device": device, "out": str(out / "runs" / f"seed{seed}")}
            ),
        )
        for seed in range(seeds)
    ]
    packed = train_runs(runs, jobs, progress)
    rows = [_row(r, tta, device) for r in runs]
    summary = {
        "recipe": recipe,
        "model": probe.model,
        "seeds": seeds,
        "device": rows[0]["device"],
        "wall_s": packed["wall_s"],
        "jobs": packed["jobs"],
        "paper_test_error": PAPER_TEST_ERROR.get(_depth(probe.model))
        if probe.model.startswith("resnet")
        else None,
        **_stats(rows, "test_error"),
        **(_stats(rows, "tta_error") if tta else {}),
        **_stats(rows, "train_seconds"),
        "runs": rows,
    }
    _plot(rows, out / "reproduce.png", summary)
    write_summary(out, "reproduce", summary, _markdown(summary, tta))
    return {"out": str(out), **summary}


def _depth(model: str) -> int | None:
    digits = "".join(c for c in model if c.isdigit())
    return int(digits) if digits else None


def _row(run: PlannedRun, tta: str | None, device: str) -> dict[str, Any]:
    summary = json.loads((run.run_dir / "summary.json").read_text())
    seconds = summary["train_seconds"]
    row = {
        "seed": run.cfg.seed,
        "test_error": summary["eval_err"],
        "train_seconds": seconds,
        "img_s": summary["iterations"] * run.cfg.data.batch_size / seconds if seconds else None,
        "device": summary.get("settings", {}).get("device_name", summary.get("device")),
        "run_dir": str(run.run_dir),
    }
    if tta:
        report = evaluate_checkpoints([str(run.run_dir / LAST)], tta=tta, device=device, precision="fp32")
        row["tta_error"] = report["top1_err"]
    return row


def _stats(rows: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    values = [r[key] for r in rows if r.get(key) is not None]
    return {
        f"{key}_mean": statistics.fmean(values) if values else None,
        f"{key}_std": statistics.stdev(values) if len(values) > 1 else None,  # sample std (n - 1)
    }


def _pm(mean: float | None, std: float | None, scale: float = 100.0, unit: str = "%") -> str:
    if mean is None:
        return "-"
    return f"{scale * mean:.2f}{unit}" + (f" +- {scale * std:.2f}" if std is not None else "")


def _markdown(s: dict[str, Any], tta: str | None) -> str:
    columns = [
        ("seed", "seed"),
        ("test_error", "test error"),
        *([("tta_error", f"{tta} TTA")] if tta else []),
    ]
    columns += [("train_seconds", "training s"), ("img_s", "img/s")]
    lines = [
        f"# {s['model']} with {s['recipe']}: {s['seeds']} seeds on {s['device']}",
        "",
        f"- test error: {_pm(s['test_error_mean'], s['test_error_std'])} (mean +- sample std)"
        + (f"; with {tta} TTA {_pm(s['tta_error_mean'], s['tta_error_std'])}" if tta else ""),
        f"- training time: {_pm(s['train_seconds_mean'], s['train_seconds_std'], 1.0, ' s')} per run; "
        f"{s['wall_s'] / 60:.1f} min of wall time for all, {s['jobs']} at a time",
        *([f"- the paper (Table 6): {s['paper_test_error']:.2f}%"] if s["paper_test_error"] else []),
        "",
        md_table(s["runs"], columns),
        "",
        "![errors per seed](reproduce.png)",
    ]
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path, s: dict[str, Any]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    seeds = [r["seed"] for r in rows]
    ax.plot(seeds, [100 * r["test_error"] for r in rows], "o", label="test error")
    ax.axhline(100 * s["test_error_mean"], lw=1, label="mean")
    if rows and rows[0].get("tta_error") is not None:
        ax.plot(seeds, [100 * r["tta_error"] for r in rows], "s", label="with flip TTA")
    if s["paper_test_error"]:
        ax.axhline(s["paper_test_error"], ls="--", color="k", lw=1, label="the paper")
    ax.set_xlabel("seed")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{s['model']}, {s['recipe']}")
    finish(fig, path, ax)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_args(p, "reproduce", data="the recipe's", seed=False)
    p.add_argument(
        "--config", dest="recipe", required=True, help="a recipe file or bundled name (cifar10_speedrun)"
    )
    p.add_argument("--model", help="default: the recipe's")
    p.add_argument("--seeds", type=arg_type(int, POSITIVE), default=5, help="runs, seeds 0..N-1 (default 5)")
    p.add_argument(
        "--tta", choices=choices(TTAMode), help="also evaluate each final model with test-time augmentation"
    )
    p.add_argument("--jobs", type=jobs_arg, default="auto", help="runs at once, or auto (default)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any config key, e.g. epochs=20")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run(
        args.recipe,
        model=args.model,
        seeds=args.seeds,
        out=args.out,
        data=args.data,
        data_dir=args.data_dir,
        overrides=one_budget(dict(parse_override(item) for item in args.overrides)),
        tta=args.tta,
        jobs=args.jobs,
        device=args.device,
        progress=args.progress,
    )
