"""Commands about models and training: ``models``, ``info``, ``train`` (and ``--resume``), ``finetune``."""

from __future__ import annotations

import argparse
import sys

from reslab.cli.options import (
    FINETUNE,
    Handler,
    add_data_flags,
    add_overrides,
    command,
    config_flag,
    flag_values,
    format_table,
    overrides_from,
    pct,
)
from reslab.config import json_text, parse_override
from reslab.errors import ReslabError, TrainingInterrupted


@command("models", "list the registered models with parameters and GMACs (multiply-adds)")
def _models(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'resnet*'")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (docs/models.md)")

    def run(args: argparse.Namespace) -> int:
        from tqdm import tqdm

        from reslab.complexity import model_stats, models_markdown
        from reslab.models import list_models

        names = list_models(args.pattern)
        if not names:
            raise ReslabError(f"no model matches {args.pattern!r} (`reslab models` lists them all)")
        # Counting is cached; a fresh cache takes about a minute for the whole registry.
        stats = [model_stats(n) for n in tqdm(names, desc="counting", leave=False, disable=None)]
        if args.json:
            print(json_text(stats))
            return 0
        if args.markdown:
            print(models_markdown(stats))
            return 0
        for s in stats:
            s["params_m"] = f"{s['params'] / 1e6:.2f}M"
            s["gmacs_s"] = f"{s['gmacs']:.2f}"
            s["input"] = "x".join(map(str, s["input_size"]))
        columns = [("name", "model"), ("family", "family"), ("layers", "layers"), ("params_m", "params")]
        print(format_table(stats, [*columns, ("gmacs_s", "GMACs"), ("input", "input")]))
        print(
            '\nGMACs: billions of multiply-adds for one image at the input size (the paper\'s "FLOPs"), '
            "counted by running the model; hardware throughput counts 2 FLOPs each (reslab bench)."
        )
        return 0

    return run


@command("info", "show a model's architecture by stage")
def _info(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("model")

    def run(args: argparse.Namespace) -> int:
        from reslab.complexity import model_stats, stage_table
        from reslab.models import get_model_entry

        entry = get_model_entry(args.model)
        stats = model_stats(entry.name)
        spec = entry.spec
        print(
            f"{entry.name}: {entry.family}, {stats['layers']} layers, {stats['params'] / 1e6:.2f}M params, "
            f"{stats['gmacs']:.2f} GMACs at {'x'.join(map(str, spec.input_size))}"
        )
        print(f"  {entry.paper}")
        print(f"  {spec.describe()}")
        rows = stage_table(entry.name)
        for r in rows:
            r["output"] = "x".join(map(str, r["output"]))
            r["params"] = f"{r['params'] / 1e6:.3f}M"
        columns = [
            ("stage", "stage"),
            ("blocks", "blocks"),
            ("widths", "branch widths"),
            ("stride", "stride"),
        ]
        print(format_table(rows, [*columns, ("output", "output CxHxW"), ("params", "params")]))
        return 0

    return run


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="YAML", help="a recipe file or bundled recipe name (e.g. cifar10_paper)"
    )
    config_flag(p, "--model", "model", "a registered model name (reslab models)")
    add_data_flags(p)
    config_flag(p, "--download", "data.download", "download CIFAR/MNIST if missing")
    config_flag(p, "--val-split", "data.val_split", "hold out this fraction of train for validation")
    budget = p.add_mutually_exclusive_group()
    config_flag(budget, "--epochs", "epochs", "with --resume: a new budget, counted from the run's start")
    config_flag(budget, "--iters", "iters", "with --resume: a new budget, counted from the run's start")
    config_flag(p, "--lr", "optim.lr")
    config_flag(p, "--amp", "amp", "mixed precision (auto: bf16 on CUDA, none on CPUs)")
    config_flag(p, "--channels-last", "channels_last")
    config_flag(
        p,
        "--compile",
        "compile",
        "torch.compile the model (auto: ImageNet-sized inputs on CUDA)",
        nargs="?",
        const="on",
    )
    config_flag(
        p,
        "--cuda-graphs",
        "cuda_graphs",
        "one CUDA graph per training step (auto: CUDA, in-memory data)",
        nargs="?",
        const="on",
    )
    config_flag(p, "--sync-bn", "sync_bn", "SyncBatchNorm across processes")
    _run_flags(p)


def _run_flags(p: argparse.ArgumentParser) -> None:
    """Flags every training command has: batch, seed, run directory, device, progress, overrides."""
    config_flag(p, "--batch-size", "data.batch_size", "per device")
    config_flag(p, "--seed", "seed")
    config_flag(p, "--out", "out", "run directory (default runs/<model>-<data>-<time>)")
    config_flag(p, "--device", "device")
    p.add_argument("--no-progress", dest="train:progress", action="store_false", default=None)
    add_overrides(p)


# What may change when a run continues (config keys -> fit's keywords); everything else is the run's own.
RESUME_CHANGES = {"device": "device", "progress": "progress", "iters": "iters", "epochs": "epochs"}
RESUME_CHANGES["data.dir"] = "data_dir"  # data that moved (the same data)


@command("train", "train a model (a recipe, flags and key=value overrides); --resume continues a run")
def _train(p: argparse.ArgumentParser) -> Handler:
    _train_flags(p)
    p.add_argument("--resume", metavar="RUN", help="continue a run (its folder or a checkpoint in it)")

    def run(args: argparse.Namespace) -> int:
        from reslab.config import load_config
        from reslab.engine import fit

        if args.resume:
            given = {**dict(parse_override(i) for i in args.overrides), **flag_values(args)}
            extra = set(given) - set(RESUME_CHANGES)
            if extra or args.config:
                raise ReslabError(
                    f"--resume continues a run with its own config; drop {', '.join(sorted(extra)) or '--config'} "
                    "(what may change: --device, --no-progress, --iters or --epochs, --data-dir)"
                )
            changes = {RESUME_CHANGES[k]: v for k, v in given.items()}
            return _report(lambda: fit(resume=args.resume, **changes))
        cfg = load_config(args.config, overrides_from(args))
        return _report(lambda: fit(cfg))

    return run


def _report(train) -> int:
    """Train, then say where everything is; an interrupted run exits 130 after saving. Under
    torchrun every process trains and the engine's rank 0 alone reports."""
    try:
        result = train()
    except TrainingInterrupted as e:
        if e.is_main:
            print(f"reslab: {e}", file=sys.stderr)
        return 130
    if not result.is_main:
        return 0
    s = result.summary
    top5 = f" (top-5 {pct(s['eval_top5_err'])})" if s["eval_top5_err"] is not None else ""
    print(
        f"\ndone: {result.eval_split} error {pct(s['eval_err'])}{top5} after {result.iterations} iterations, "
        f"{s['train_seconds'] / 60:.1f} min of training"
    )
    d = result.run_dir
    print(f"  run directory  {d}")
    print(f"  checkpoints    {d / 'last.pt'}, {d / 'best.pt'}")
    print(f"  plots          {d / 'curves.png'}, {s['confusion_png']}")
    print(f"  metrics        {d / 'metrics.csv'}, {d / 'summary.json'}, tensorboard/")
    return 0


@command(
    "finetune", "fine-tune pretrained weights on a folder of images: new head, frozen and unfrozen stages"
)
def _finetune(p: argparse.ArgumentParser) -> Handler:
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="SOURCE",
        help="a reslab checkpoint, a weights file (with --model), torchvision:resnet50.IMAGENET1K_V2, "
        "hf-hub:timm/resnet50.a1_in1k or local-dir:PATH",
    )
    config_flag(
        p, "--data-dir", "data.dir", "ImageFolder layout (train/ + val/, or one folder)", required=True
    )
    p.add_argument("--model", help="architecture (default: the source's)")
    config_flag(p, "--freeze", "freeze", "base (default) | stages:N | none", target=FINETUNE)
    config_flag(
        p,
        "--unfreeze-at",
        "unfreeze_at",
        "EPOCH:N: unfreeze the last N stages at EPOCH",
        target=FINETUNE,
        nargs="*",
    )
    config_flag(p, "--head-lr", "head_lr", target=FINETUNE)
    config_flag(p, "--base-lr", "base_lr", "default: head-lr / 10", target=FINETUNE)
    p.add_argument(
        "--frozen-bn",
        dest=f"{FINETUNE}:frozen_bn",
        action="store_const",
        const="frozen",
        help="FrozenBatchNorm in parts that stay frozen",
    )
    config_flag(p, "--in-chans-mode", "in_chans_mode", target=FINETUNE)
    config_flag(p, "--epochs", "epochs")
    config_flag(p, "--val-split", "data.val_split", "default 0.2 when the folder has no val/ or test/")
    _run_flags(p)

    def run(args: argparse.Namespace) -> int:
        from reslab.engine import fit
        from reslab.transfer import finetune_config

        overrides = overrides_from(args)
        data_dir = overrides.pop("data.dir")
        overrides.pop("data.name", None)  # fine-tuning reads a folder
        cfg, policy = finetune_config(
            args.source, data_dir, model=args.model, overrides=overrides, finetune=flag_values(args, FINETUNE)
        )
        print(f"reslab: fine-tuning {cfg.model} from {policy.ft.source} on {data_dir}")
        return _report(lambda: fit(cfg, policy=policy))

    return run
