"""The ``reslab`` command: a thin layer that parses arguments and calls library functions.

Errors print one line and exit non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from reslab.errors import ReslabError

Handler = Callable[[argparse.Namespace], int | None]
Configure = Callable[[argparse.ArgumentParser], Handler]
_COMMANDS: list[tuple[str, str, Configure]] = []


def command(name: str, help: str) -> Callable[[Configure], Configure]:
    """Register a subcommand: the decorated function adds its arguments and returns its handler."""

    def wrap(configure: Configure) -> Configure:
        _COMMANDS.append((name, help, configure))
        return configure

    return wrap


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as an aligned text table; ``columns`` are (key, header) pairs."""
    cells = [[h for _, h in columns]] + [[str(r[k]) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])


@command("models", "list the registered models with parameters and GFLOPs")
def _models(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'resnet*'")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (docs/models.md)")

    def run(args: argparse.Namespace) -> int:
        from reslab.complexity import model_stats, models_markdown
        from reslab.models import list_models

        names = list_models(args.pattern)
        if not names:
            raise ReslabError(f"no model matches {args.pattern!r} (`reslab models` lists them all)")
        stats = [model_stats(n) for n in names]
        if args.json:
            print(json.dumps(stats, indent=1))
            return 0
        if args.markdown:
            print(models_markdown(stats))
            return 0
        for s in stats:
            s["params_m"] = f"{s['params'] / 1e6:.2f}M"
            s["gflops_s"] = f"{s['gflops']:.2f}"
            s["input"] = "x".join(map(str, s["input_size"]))
        print(
            format_table(
                stats,
                [
                    ("name", "model"),
                    ("family", "family"),
                    ("layers", "layers"),
                    ("params_m", "params"),
                    ("gflops_s", "GFLOPs"),
                    ("input", "input"),
                ],
            )
        )
        print("\nGFLOPs: multiply-adds for one image at the input size, counted by running the model.")
        return 0

    return run


@command("info", "show a model's architecture by stage")
def _info(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("model")

    def run(args: argparse.Namespace) -> int:
        from reslab.complexity import model_stats, stage_table
        from reslab.models import get_model_entry

        entry = get_model_entry(args.model)
        stats = model_stats(args.model)
        spec = entry.spec
        print(
            f"{args.model}: {entry.family}, {stats['layers']} layers, {stats['params'] / 1e6:.2f}M params, "
            f"{stats['gflops']:.2f} GFLOPs at {'x'.join(map(str, spec.input_size))}"
        )
        print(f"  {entry.paper}")
        shortcut = {
            "none": "none (plain network)",
            "A": "A (zero-pad)",
            "B": "B (project on shape change)",
            "C": "C (project everywhere)",
            "D": "D (avg-pool + project)",
        }[spec.shortcut]
        print(
            f"  block {spec.block}, stem {spec.stem}, shortcut {shortcut}"
            + (", pre-activation" if spec.preact else "")
            + (f", groups {spec.groups}x{spec.base_width}d" if spec.groups > 1 else "")
            + (f", attention {spec.attn}" if spec.attn else "")
        )
        rows = stage_table(args.model)
        for r in rows:
            r["output"] = "x".join(map(str, r["output"]))
            r["params"] = f"{r['params'] / 1e6:.3f}M"
        print(
            format_table(
                rows,
                [
                    ("stage", "stage"),
                    ("blocks", "blocks"),
                    ("widths", "branch widths"),
                    ("stride", "stride"),
                    ("output", "output CxHxW"),
                    ("params", "params"),
                ],
            )
        )
        return 0

    return run


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="YAML", help="a recipe file or bundled recipe name (e.g. cifar10_paper)"
    )
    p.add_argument("--model", help="a registered model name (reslab models)")
    p.add_argument("--data", help="default | mnist | cifar10 | cifar100 | folder")
    p.add_argument("--data-dir", metavar="DIR")
    p.add_argument("--download", action="store_true", default=None, help="download CIFAR/MNIST if missing")
    p.add_argument(
        "--val-split", type=float, metavar="F", help="hold out this fraction of train for validation"
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float)
    budget.add_argument("--iters", type=int)
    p.add_argument("--batch-size", type=int, help="per device")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/<model>-<data>-<time>)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true", default=None)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm across processes")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="any config key, e.g. optim.nesterov=true"
    )


_FLAG_KEYS = {
    "model": "model",
    "data": "data.name",
    "data_dir": "data.dir",
    "download": "data.download",
    "val_split": "data.val_split",
    "epochs": "epochs",
    "iters": "iters",
    "batch_size": "data.batch_size",
    "lr": "optim.lr",
    "seed": "seed",
    "out": "out",
    "device": "device",
    "amp": "amp",
    "channels_last": "channels_last",
    "compile": "compile",
    "sync_bn": "sync_bn",
    "progress": "progress",
}


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line flags and key=value pairs as dotted config overrides (flags win)."""
    from reslab.config import parse_override

    overrides = dict(parse_override(item) for item in args.overrides)
    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    if "epochs" in overrides or "iters" in overrides:  # one budget replaces the recipe's other one
        overrides.setdefault("iters" if "epochs" in overrides else "epochs", None)
    return overrides


@command("train", "train a model (a recipe, flags and key=value overrides); --resume continues a run")
def _train(p: argparse.ArgumentParser) -> Handler:
    _train_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where it stopped")

    def run(args: argparse.Namespace) -> int:
        from reslab.config import load_config

        overrides = train_overrides(args)
        if args.resume:
            extra = set(overrides) - {"device", "progress"}
            if extra or args.config:
                raise ReslabError(
                    f"--resume continues a run with its own config; drop {', '.join(sorted(extra)) or '--config'}"
                )
            cfg = load_config(overrides=overrides)
        else:
            cfg = load_config(args.config, overrides)
        return _fit_and_report(cfg, args.resume)

    return run


def _fit_and_report(cfg, resume: str | None = None) -> int:
    """Train, then say where everything is; an interrupted run exits 130 after saving. Under torchrun
    every process trains and rank 0 alone reports."""
    from reslab.engine import fit
    from reslab.engine.loop import TrainingInterrupted

    report = int(os.environ.get("RANK", "0")) == 0
    try:
        result = fit(cfg, resume=resume)
    except TrainingInterrupted as e:
        if report:
            print(f"reslab: {e}", file=sys.stderr)
        return 130
    if not report:
        return 0
    s = result.summary
    print(
        f"\ndone: {result.eval_split} error {100 * s['eval_err']:.2f}% (top-5 {100 * s['eval_top5_err']:.2f}%) "
        f"after {result.iterations} iterations, {s['train_seconds'] / 60:.1f} min of training"
    )
    print(f"  run directory  {result.run_dir}")
    print(f"  checkpoints    {result.run_dir / 'last.pt'}, {result.run_dir / 'best.pt'}")
    print(f"  plots          {result.run_dir / 'curves.png'}, {s['confusion_png']}")
    print(
        f"  metrics        {result.run_dir / 'metrics.csv'}, {result.run_dir / 'summary.json'}, tensorboard/"
    )
    return 0


@command(
    "eval", "evaluate checkpoints (several: an ensemble): top-1/top-5 error, per-class accuracy, confusion"
)
def _eval(p: argparse.ArgumentParser) -> Handler:
    p.add_argument(
        "--checkpoint", required=True, nargs="+", metavar="CKPT", help="one, or several to ensemble"
    )
    p.add_argument("--model", help="architecture of a bare state dict")
    p.add_argument("--data", help="default: the data the checkpoint was trained on")
    p.add_argument("--data-dir", metavar="DIR")
    p.add_argument("--tta", choices=("flip", "10crop"), help="test-time augmentation")
    p.add_argument("--out", metavar="DIR", help="where to write eval.json and confusion.png")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from reslab.inference import evaluate_checkpoints

        first = Path(args.checkpoint[0])
        out = (
            Path(args.out)
            if args.out
            else first.parent / f"eval-{first.stem}{'-ensemble' if len(args.checkpoint) > 1 else ''}"
        )
        report = evaluate_checkpoints(
            args.checkpoint,
            data=args.data,
            data_dir=args.data_dir,
            model=args.model,
            device=args.device,
            out_dir=out,
            tta=args.tta,
        )
        if args.json:
            print(json.dumps(report, indent=1))
            return 0
        if len(report["members"]) > 1:
            for m in report["members"]:
                print(f"member {m['checkpoint']} ({m['arch']}): top-1 error {100 * m['err']:.2f}%")
        label = "ensemble" if len(report["members"]) > 1 else report["arch"]
        print(
            f"{label} on {report['data']} {report['split']} ({report['n']} images"
            f"{', ' + args.tta + ' TTA' if args.tta else ''}): top-1 error {100 * report['top1_err']:.2f}%, "
            f"top-5 error {100 * report['top5_err']:.2f}%, loss {report['loss']:.4f}"
        )
        rows = [{"cls": c, "acc": f"{100 * a:.1f}%"} for c, a in report["per_class_acc"].items()]
        print(format_table(rows, [("cls", "class"), ("acc", "accuracy")]))
        print(f"confusion matrix: {report['confusion_png']}")
        return 0

    return run


@command("predict", "classify images with a checkpoint (several: their ensemble)")
def _predict(p: argparse.ArgumentParser) -> Handler:
    p.add_argument(
        "--checkpoint", required=True, nargs="+", metavar="CKPT", help="one, or several to ensemble"
    )
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR")
    p.add_argument("--model", help="architecture of a bare state dict")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--tta", choices=("flip", "10crop"))
    p.add_argument(
        "--strict", action="store_true", help="fail on unreadable or non-image files instead of skipping"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from reslab.engine.loop import resolve_device
        from reslab.inference import list_images, load_members, predict
        from reslab.weights import is_checkpoint_path

        # `--checkpoint A.pt B.pt photo.jpg dir/`: the option takes the checkpoint files, the rest are inputs.
        checkpoints = [c for c in args.checkpoint if is_checkpoint_path(c)]
        inputs = [c for c in args.checkpoint if not is_checkpoint_path(c)] + args.inputs
        if not checkpoints or not inputs:
            raise ReslabError("usage: reslab predict --checkpoint CKPT [CKPT ...] IMAGE_OR_DIR [...]")
        nets, metas, raw = load_members(checkpoints, args.model, resolve_device(args.device), args.tta)
        results = predict(
            nets, metas[0]["classes"], raw, list_images(inputs, args.strict), args.topk, strict=args.strict
        )
        if args.json:
            print(json.dumps(results, indent=1))
        else:
            for r in results:
                top = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r["top"])
                print(f"{r['file']}: {top}")
        return 0 if results else 1

    return run


@command("embed", "write L2-normalised embeddings of a folder of images (an index for reslab search)")
def _embed(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_DIR")
    p.add_argument("--out", required=True, metavar="FILE.npy")
    p.add_argument("--model", help="architecture of a bare state dict")
    p.add_argument("--device", default="auto")

    def run(args: argparse.Namespace) -> int:
        from reslab.embed import build_index
        from reslab.engine.loop import resolve_device

        info = build_index(
            args.checkpoint, args.inputs, args.out, model=args.model, device=resolve_device(args.device)
        )
        print(
            f"{info['count']} embeddings of dimension {info['dim']}: {info['embeddings']} (files: {info['files']})"
        )
        return 0

    return run


@command("search", "find the indexed images most similar to a query image")
def _search(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--index", required=True, metavar="FILE.npy")
    p.add_argument("queries", nargs="+", metavar="IMAGE")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from reslab.embed import search
        from reslab.engine.loop import resolve_device

        results = search(args.index, args.queries, args.topk, resolve_device(args.device))
        if args.json:
            print(json.dumps(results, indent=1))
            return 0
        for r in results:
            print(r["query"])
            for m in r["matches"]:
                print(f"  {m['similarity']:.4f}  {m['file']}")
        return 0

    return run


@command("export", "export a checkpoint to ONNX / TorchScript / torch.export and verify it on real images")
def _export(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript", "exported"))
    p.add_argument("--batch", default="dynamic", help="dynamic (default) or a fixed batch size")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the convolutions first")
    p.add_argument("--out", metavar="FILE")
    p.add_argument("--model", help="architecture of a bare state dict")
    p.add_argument(
        "--images", metavar="DIR", help="real images to verify on (default: the checkpoint's test data)"
    )
    p.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from reslab.deploy import real_inputs
        from reslab.deploy.export import FORMATS, export_model
        from reslab.inference import load_checkpoint

        batch = args.batch if args.batch == "dynamic" else _positive_int(args.batch, "--batch")
        net, meta = load_checkpoint(args.checkpoint, args.model)
        out = args.out or str(Path(args.checkpoint).with_suffix(FORMATS[args.format]))
        report = export_model(
            net,
            meta,
            args.format,
            out,
            batch=batch,
            fold_bn=args.fold_bn,
            verify_inputs=real_inputs(meta, args.images, 16),
        )
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            print(
                f"wrote {report['path']} ({report['bytes'] / 1e6:.1f} MB, batch {batch}"
                f"{', BN folded' if args.fold_bn else ''}) + {report['path']}.json"
            )
            print(
                f"verified on {report['verified_on']} real images: max abs diff {report['max_abs_diff']:.2e}, "
                f"top-1 agreement {100 * report['top1_agreement']:.1f}%"
            )
        return 0

    return run


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ReslabError(f"{flag} {text!r}: expected a positive number")
    return value


@command(
    "quantize", "int8 post-training quantization (ONNX Runtime) with its accuracy and speed cost measured"
)
def _quantize(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument(
        "--calib", metavar="DIR", help="calibration images (default: the checkpoint's training images)"
    )
    p.add_argument("--calib-n", type=int, default=256, help="number of calibration images")
    p.add_argument("--out", metavar="FILE.int8.onnx")
    p.add_argument("--model", help="architecture of a bare state dict")
    p.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from reslab.deploy.quantize import quantize_report

        r = quantize_report(args.checkpoint, args.out, args.calib, args.calib_n, args.model)
        if args.json:
            print(json.dumps(r, indent=1))
            return 0
        print(
            f"int8 model: {r['int8']} ({r['bytes']['int8'] / 1e6:.2f} MB vs {r['bytes']['fp32'] / 1e6:.2f} MB fp32), "
            f"calibrated on {r['calibration_images']} real images"
        )
        if "int8_top1_err" in r:
            print(
                f"accuracy on {r['test_images']} test images: fp32 top-1 error {100 * r['fp32_top1_err']:.2f}%, "
                f"int8 {100 * r['int8_top1_err']:.2f}% ({100 * (r['int8_top1_err'] - r['fp32_top1_err']):+.2f} points), "
                f"top-1 agreement {100 * r['top1_agreement']:.1f}%"
            )
        for bs in (1, 8):
            f, q = r[f"fp32_b{bs}"], r[f"int8_b{bs}"]
            print(
                f"batch {bs}: fp32 {f['img_per_s']:.0f} img/s, int8 {q['img_per_s']:.0f} img/s "
                f"({r[f'int8_speedup_b{bs}']:.2f}x)"
            )
        return 0

    return run


@command(
    "bench",
    "inference latency/throughput: torchvision vs reslab eager, channels_last+folded BN, compile, ORT",
)
def _bench(p: argparse.ArgumentParser) -> Handler:
    from reslab.deploy.bench import BACKENDS

    p.add_argument("target", metavar="MODEL_OR_CKPT")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--input-size", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated: {', '.join(BACKENDS)}")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timed runs per cell")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")

    def run(args: argparse.Namespace) -> int:
        from reslab.deploy.bench import bench

        batches = tuple(_positive_int(b, "--batch") for b in args.batch.split(","))
        say = None if args.json else (lambda msg: print(f"  ... {msg}", file=sys.stderr, flush=True))
        result = bench(
            args.target,
            batches=batches,
            input_size=args.input_size,
            device=args.device,
            backends=tuple(args.backends.split(",")),
            min_time=args.min_time,
            progress=say,
        )
        if args.json:
            print(json.dumps(result["rows"], indent=1))
            return 0
        print(
            f"{result['model']} at {'x'.join(map(str, result['input_size']))} on {result['device']} "
            f"({result['threads']} threads); fp32 matmul peak {result['peak_gflops']:.0f} GFLOP/s; "
            f"{result['gflops_per_image']:.2f} GFLOP per image"
        )
        rows = [
            {
                **r,
                "ips": f"{r['img_per_s']:.1f}",
                "p50": f"{r['p50_ms']:.1f}",
                "p90": f"{r['p90_ms']:.1f}",
                "spread": f"{r['spread_pct']:.0f}%",
                "gf": f"{r['gflops_per_s']:.0f}",
                "peak": f"{100 * r['peak_fraction']:.0f}%",
                "ratio": f"{r['vs_torchvision']:.2f}x" if r["vs_torchvision"] else "-",
            }
            for r in result["rows"]
        ]
        print(
            format_table(
                rows,
                [
                    ("backend", "backend"),
                    ("batch", "batch"),
                    ("ips", "img/s"),
                    ("p50", "p50 ms"),
                    ("p90", "p90 ms"),
                    ("spread", "p90/p50"),
                    ("gf", "GFLOP/s"),
                    ("peak", "of peak"),
                    ("ratio", "vs torchvision"),
                ],
            )
        )
        return 0

    return run


@command(
    "finetune", "fine-tune pretrained weights on a folder of images: new head, frozen and unfrozen stages"
)
def _finetune(p: argparse.ArgumentParser) -> Handler:
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="SOURCE",
        help="a reslab checkpoint, a weights file (with --model), or torchvision:resnet50.IMAGENET1K_V2",
    )
    p.add_argument(
        "--data-dir",
        required=True,
        metavar="FOLDER",
        help="ImageFolder layout (train/ + val/, or one folder)",
    )
    p.add_argument("--model", help="architecture (default: the source's)")
    p.add_argument("--freeze", default=None, help="base (default) | stages:N | none")
    p.add_argument(
        "--unfreeze-at",
        nargs="*",
        default=None,
        metavar="EPOCH:N",
        help="unfreeze the last N stages at EPOCH",
    )
    p.add_argument("--head-lr", type=float)
    p.add_argument("--base-lr", type=float, help="default: head-lr / 10")
    p.add_argument("--frozen-bn", action="store_true", help="FrozenBatchNorm2d in parts that stay frozen")
    p.add_argument("--in-chans-mode", choices=("auto", "sum", "repeat"))
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--val-split", type=float, help="default 0.2 when the folder has no val/ or test/")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", metavar="DIR")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("overrides", nargs="*", metavar="key=value")

    def run(args: argparse.Namespace) -> int:
        from reslab.config import parse_override
        from reslab.transfer import finetune_config

        overrides = dict(parse_override(item) for item in args.overrides)
        flags = {
            "finetune.freeze": args.freeze,
            "finetune.unfreeze_at": args.unfreeze_at,
            "finetune.head_lr": args.head_lr,
            "finetune.base_lr": args.base_lr,
            "finetune.frozen_bn": "frozen" if args.frozen_bn else None,
            "finetune.in_chans_mode": args.in_chans_mode,
            "epochs": args.epochs,
            "data.batch_size": args.batch_size,
            "data.val_split": args.val_split,
            "seed": args.seed,
            "out": args.out,
            "device": args.device,
            "progress": args.progress,
        }
        overrides.update({k: v for k, v in flags.items() if v is not None})
        cfg = finetune_config(args.source, args.data_dir, model=args.model, overrides=overrides)
        print(f"reslab: fine-tuning {cfg.model} from {cfg.finetune.source} on {args.data_dir}")
        return _fit_and_report(cfg)

    return run


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t]
    except ValueError:
        raise ReslabError(f"{text!r}: expected comma-separated numbers, e.g. 20,32,56") from None


@command("analyze", "the residual-learning lab: degradation, gradients, responses, landscape, lesion, report")
def _analyze(p: argparse.ArgumentParser) -> Handler:
    studies = p.add_subparsers(dest="study", metavar="STUDY", required=True)

    def study(name: str, help: str) -> argparse.ArgumentParser:
        sp = studies.add_parser(name, help=help, description=help)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if name != "report":
            sp.add_argument("--out", metavar="DIR", help=f"study folder (default runs/analyze-{name})")
            sp.add_argument("--no-progress", dest="progress", action="store_false")
        return sp

    sp = study("degradation", "train plain and residual twins at several depths (the paper's Figs. 1 and 6)")
    sp.add_argument("--depths", default="20,56", help="comma-separated depths (default 20,56)")
    sp.add_argument("--quick", action="store_true", help="a few hundred iterations: minutes on a CPU")
    sp.add_argument("--config", default="cifar10_paper", help="recipe for full runs (default cifar10_paper)")
    sp.add_argument("--data", help="default: folder when --data-dir is given, else the embedded default")
    sp.add_argument("--data-dir", metavar="DIR")
    sp.add_argument("--iters", type=int, help="override the budget")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="auto")
    sp = study("gradients", "per-layer gradient norms of plain vs residual nets, at init and after training")
    sp.add_argument("--depths", default="20,56,110")
    sp.add_argument("--steps", type=int, default=100, help="training steps before the second measurement")
    sp.add_argument("--batch", type=int, default=128)
    sp.add_argument(
        "--correlation", action="store_true", help="also the shattered-gradients correlation curve"
    )
    sp.add_argument("--data")
    sp.add_argument("--data-dir", metavar="DIR")
    sp.add_argument("--seed", type=int, default=0)
    sp = study("responses", "std of each 3x3 layer's response on the test set (the paper's Fig. 7)")
    sp.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT")
    sp.add_argument("--limit", type=int, default=1000, help="test images to use")
    sp.add_argument("--data")
    sp.add_argument("--data-dir", metavar="DIR")
    sp = study("landscape", "loss landscape along filter-normalised directions (Li et al. 2018)")
    sp.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT", help="one, or two side by side")
    sp.add_argument("--grid", type=int, default=21, help="points per axis (default 21; the paper used 51)")
    sp.add_argument("--span", type=float, default=1.0, help="coordinates run over [-span, span]")
    sp.add_argument("--samples", type=int, default=1000, help="training images (no augmentation)")
    sp.add_argument("--mode", choices=("1d", "2d", "both"), default="both")
    sp.add_argument("--interpolate", action="store_true", help="also the 1D path between two checkpoints")
    sp.add_argument("--replot", action="store_true", help="redraw from the saved NPZ files")
    sp.add_argument("--seed", type=int, default=0)
    sp = study("lesion", "remove residual blocks at test time (Veit et al. 2016)")
    sp.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT")
    sp.add_argument("--limit", type=int, default=2000, help="test images to use")
    sp.add_argument("--draws", type=int, default=5, help="random draws per number of removed blocks")
    sp.add_argument("--max-k", type=int, default=10, help="remove up to this many blocks at random")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--data")
    sp.add_argument("--data-dir", metavar="DIR")
    sp = study("report", "gather study and run folders into one self-contained HTML page")
    sp.add_argument("folders", nargs="+", metavar="RUN_OR_STUDY_DIR")
    sp.add_argument("--out", metavar="FILE.html")

    def run(args: argparse.Namespace) -> int:
        from reslab import analysis

        if args.study == "report":
            print(f"report: {analysis.report.build_report(args.folders, args.out)}")
            return 0
        common = {"out": args.out}
        if args.study == "degradation":
            result = analysis.degradation.run(
                _int_list(args.depths),
                quick=args.quick,
                recipe=args.config,
                data=args.data,
                data_dir=args.data_dir,
                iters=args.iters,
                seed=args.seed,
                progress=args.progress,
                device=args.device,
                **common,
            )
        elif args.study == "gradients":
            result = analysis.gradients.run(
                _int_list(args.depths),
                steps=args.steps,
                batch=args.batch,
                data=args.data,
                data_dir=args.data_dir,
                correlation=args.correlation,
                seed=args.seed,
                progress=args.progress,
                **common,
            )
        elif args.study == "responses":
            result = analysis.responses.run(
                args.checkpoint, limit=args.limit, data=args.data, data_dir=args.data_dir, **common
            )
        elif args.study == "landscape":
            result = analysis.landscape.run(
                args.checkpoint,
                grid=args.grid,
                span=args.span,
                samples=args.samples,
                mode=args.mode,
                interpolate=args.interpolate,
                replot=args.replot,
                seed=args.seed,
                progress=args.progress,
                **common,
            )
        else:
            result = analysis.lesion.run(
                args.checkpoint,
                limit=args.limit,
                draws=args.draws,
                max_k=args.max_k,
                seed=args.seed,
                data=args.data,
                data_dir=args.data_dir,
                progress=args.progress,
                **common,
            )
        print(Path(result["out"], "summary.md").read_text())
        print(f"study folder: {result['out']}")
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors"
    )
    parser = argparse.ArgumentParser(
        prog="reslab",
        description="Deep residual networks: models, training, analysis, deployment.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help, configure in _COMMANDS:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=configure(p))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    try:
        code = args.func(args) or 0
        if args.command in ("train", "finetune"):  # under torchrun: leave the process group cleanly
            from reslab.engine.distributed import shutdown

            shutdown()
        return code
    except ReslabError as e:
        if debug:
            raise
        print(f"reslab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reslab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an environment problem: still one line unless --debug
        if debug:
            raise
        msg = (str(e).strip().splitlines() or [""])[0]
        print(
            f"reslab: error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
