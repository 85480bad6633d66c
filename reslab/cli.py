"""The ``reslab`` command: a thin layer that parses arguments and calls library functions.

Each subcommand declares its arguments next to its handler. Flags that set a config key are
declared with that key (:func:`config_flag`): their choices and checks come from the config's own
annotations, so a flag and a ``key=value`` override are validated alike. Library modules are
imported when a command runs, not when the parser is built: importing torch takes seconds, and
``reslab --help`` should not.

Errors print one line and exit non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from reslab.config import (
    POSITIVE,
    FinetuneConfig,
    Precision,
    TrainConfig,
    arg_type,
    base_type,
    choices,
    int_list,
    key_type,
    parse_value,
)
from reslab.errors import ReslabError, TrainingInterrupted

Handler = Callable[[argparse.Namespace], int | None]
Configure = Callable[[argparse.ArgumentParser], Handler]
_COMMANDS: list[tuple[str, str, Configure]] = []
PIPE_CLOSED = 141  # 128 + SIGPIPE: what Unix tools exit with when a reader such as `head` stops


def command(name: str, help: str) -> Callable[[Configure], Configure]:
    """Register a subcommand: the decorated function adds its arguments and returns its handler."""

    def wrap(configure: Configure) -> Configure:
        _COMMANDS.append((name, help, configure))
        return configure

    return wrap


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other reslab failure."""

    def error(self, message: str) -> None:
        self.exit(2, f"reslab: error: {self.prog}: {message} (see {self.prog} --help)\n")


# --- flags bound to config keys ---------------------------------------------------------------

TRAIN, FINETUNE = "train", "finetune"
_TARGETS = {TRAIN: TrainConfig, FINETUNE: FinetuneConfig}


def config_flag(
    p: argparse.ArgumentParser,
    flag: str,
    key: str,
    help: str | None = None,
    *,
    target: str = TRAIN,
    **kwargs: Any,
) -> None:
    """A flag that sets config ``key``: choices from the key's ``Literal``, booleans as switches;
    the value is checked when the config is built, like a ``key=value`` override."""
    tp = base_type(key_type(key, _TARGETS[target]))
    dest = f"{target}:{key}"
    if tp is bool:
        p.add_argument(flag, dest=dest, action="store_true", default=None, help=help)
    elif kwargs.get("nargs") == "*":
        p.add_argument(flag, dest=dest, metavar=key.rsplit(".", 1)[-1].upper(), help=help, **kwargs)
    else:
        meta = None if choices(tp) else key.rsplit(".", 1)[-1].upper()
        p.add_argument(flag, dest=dest, choices=choices(tp) or None, metavar=meta, help=help, **kwargs)


def flag_values(args: argparse.Namespace, target: str = TRAIN) -> dict[str, Any]:
    """The config keys the command line set for ``target``, as values (YAML-read unless the key is
    a string), ready for validation."""
    out = {}
    for dest, raw in vars(args).items():
        prefix, _, key = dest.partition(":")
        if prefix != target or raw is None:
            continue
        tp = base_type(key_type(key, _TARGETS[target]))
        out[key] = raw if tp is str or choices(tp) or not isinstance(raw, str) else parse_value(raw)
    return out


def add_data_flags(p: argparse.ArgumentParser) -> None:
    config_flag(p, "--data", "data.name", "default: folder when --data-dir is given, else the recipe's")
    config_flag(
        p, "--data-dir", "data.dir", "a dataset folder (implies --data folder unless --data says otherwise)"
    )


def overrides_from(args: argparse.Namespace, target: str = TRAIN) -> dict[str, Any]:
    """Flags and ``key=value`` pairs as dotted config overrides (flags win). A data folder without
    ``--data`` means ``folder``; one budget (epochs or iterations) replaces the recipe's other one."""
    from reslab.config import parse_override

    overrides = dict(parse_override(item) for item in getattr(args, "overrides", None) or [])
    overrides.update(flag_values(args, target))
    if "data.dir" in overrides and "data.name" not in overrides:
        overrides["data.name"] = "folder"
    if "epochs" in overrides or "iters" in overrides:
        overrides.setdefault("iters" if "epochs" in overrides else "epochs", None)
    return overrides


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="any config key, e.g. optim.nesterov=true"
    )


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as an aligned text table; ``columns`` are (key, header) pairs."""
    cells = [[h for _, h in columns]] + [[str(r[k]) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


# --- commands -----------------------------------------------------------------------------------


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
        from tqdm import tqdm

        # Counting is cached; a fresh cache takes about a minute for the whole registry.
        stats = [model_stats(n) for n in tqdm(names, desc="counting", leave=False, disable=None)]
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
        columns = [("name", "model"), ("family", "family"), ("layers", "layers"), ("params_m", "params")]
        print(format_table(stats, [*columns, ("gflops_s", "GFLOPs"), ("input", "input")]))
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
        stats = model_stats(entry.name)
        spec = entry.spec
        print(
            f"{entry.name}: {entry.family}, {stats['layers']} layers, {stats['params'] / 1e6:.2f}M params, "
            f"{stats['gflops']:.2f} GFLOPs at {'x'.join(map(str, spec.input_size))}"
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
    config_flag(budget, "--epochs", "epochs")
    config_flag(budget, "--iters", "iters")
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
    p.add_argument("--no-progress", dest=f"{TRAIN}:progress", action="store_false", default=None)
    add_overrides(p)


@command("train", "train a model (a recipe, flags and key=value overrides); --resume continues a run")
def _train(p: argparse.ArgumentParser) -> Handler:
    _train_flags(p)
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run (its folder or its last.pt)")

    def run(args: argparse.Namespace) -> int:
        from reslab.config import load_config

        overrides = overrides_from(args)
        if args.resume:
            extra = set(overrides) - {"device", "progress"}
            if extra or args.config:
                raise ReslabError(
                    f"--resume continues a run with its own config; drop {', '.join(sorted(extra)) or '--config'}"
                )
            return _fit_and_report(load_config(overrides=overrides), args.resume)
        return _fit_and_report(load_config(args.config, overrides))

    return run


def _fit_and_report(cfg: TrainConfig, resume: str | None = None, policy=None) -> int:
    """Train, then say where everything is; an interrupted run exits 130 after saving. Under torchrun
    every process trains and rank 0 alone reports."""
    from reslab.engine import fit
    from reslab.engine.checkpoint import resume_file
    from reslab.engine.distributed import shutdown
    from reslab.transfer import policy_for
    from reslab.weights import read_file

    if resume is not None and policy is None:
        policy = policy_for(read_file(resume_file(resume)).get("policy"))
    report = int(os.environ.get("RANK", "0")) == 0
    try:
        result = fit(cfg, resume=resume, policy=policy)
    except TrainingInterrupted as e:
        shutdown()  # under torchrun: leave the process group cleanly
        if report:
            print(f"reslab: {e}", file=sys.stderr)
        return 130
    shutdown()
    if not report:
        return 0
    s = result.summary
    top5 = f" (top-5 {_pct(s['eval_top5_err'])})" if s["eval_top5_err"] is not None else ""
    print(
        f"\ndone: {result.eval_split} error {_pct(s['eval_err'])}{top5} after {result.iterations} iterations, "
        f"{s['train_seconds'] / 60:.1f} min of training"
    )
    d = result.run_dir
    print(f"  run directory  {d}")
    print(f"  checkpoints    {d / 'last.pt'}, {d / 'best.pt'}")
    print(f"  plots          {d / 'curves.png'}, {s['confusion_png']}")
    print(f"  metrics        {d / 'metrics.csv'}, {d / 'summary.json'}, tensorboard/")
    return 0


def _precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=choices(Precision),
        default="auto",
        help="inference arithmetic (auto: fp32 on CPUs; on CUDA the faster of bf16 and fp16, checked against fp32)",
    )


def _say_precision(chosen: dict[str, Any]) -> None:
    """One stderr line on the precision used, when it is not plain fp32: how it was chosen and how
    its predictions agree with fp32's."""
    if chosen["precision"] == "fp32":
        return
    how = (
        " (auto: " + ", ".join(f"{k} {v:.2f} ms" for k, v in chosen["ms_per_batch"].items()) + " per batch)"
        if "ms_per_batch" in chosen
        else ""
    )
    agree = (
        f"; top-1 agreement with fp32 {100 * chosen['top1_agreement_with_fp32']:.1f}% on {chosen['agreement_images']} images"
        if "top1_agreement_with_fp32" in chosen
        else ""
    )
    print(f"reslab: precision {chosen['precision']}{how}{agree}", file=sys.stderr)


def _checkpoints_arg(p: argparse.ArgumentParser, help: str = "one, or several to ensemble") -> None:
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT", help=help)
    p.add_argument("--model", help="architecture of bare state dicts (reslab checkpoints name their own)")


@command(
    "eval", "evaluate checkpoints (several: an ensemble): top-1/top-5 error, per-class accuracy, confusion"
)
def _eval(p: argparse.ArgumentParser) -> Handler:
    _checkpoints_arg(p)
    p.add_argument(
        "--data", choices=choices(key_type("data.name")), help="default: the data it was trained on"
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="a dataset folder (implies --data folder unless --data says otherwise)",
    )
    p.add_argument("--tta", choices=("flip", "10crop"), help="test-time augmentation")
    p.add_argument("--out", metavar="DIR", help="where to write eval.json and confusion.png")
    p.add_argument("--device", default="auto")
    _precision_arg(p)
    p.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from reslab.inference import evaluate_checkpoints

        first = Path(args.checkpoint[0])
        ensemble = len(args.checkpoint) > 1
        out = (
            Path(args.out)
            if args.out
            else first.parent / f"eval-{first.stem}{'-ensemble' if ensemble else ''}"
        )
        report = evaluate_checkpoints(
            args.checkpoint,
            data=args.data,
            data_dir=args.data_dir,
            model=args.model,
            device=args.device,
            out_dir=out,
            tta=args.tta,
            precision=args.precision,
        )
        if args.json:
            print(json.dumps(report, indent=1))
            return 0
        _say_precision(report["precision"])
        if ensemble:
            for m in report["members"]:
                print(f"member {m['checkpoint']} ({m['arch']}): top-1 error {_pct(m['err'])}")
        label = "ensemble" if ensemble else report["arch"]
        top5 = f", top-5 error {_pct(report['top5_err'])}" if report["top5_err"] is not None else ""
        print(
            f"{label} on {report['data']} {report['split']} ({report['n']} images"
            f"{', ' + args.tta + ' TTA' if args.tta else ''}): top-1 error {_pct(report['top1_err'])}"
            f"{top5}, loss {report['loss']:.4f}"
        )
        rows = [{"cls": c, "acc": f"{100 * a:.1f}%"} for c, a in report["per_class_acc"].items()]
        print(format_table(rows, [("cls", "class"), ("acc", "accuracy")]))
        print(f"confusion matrix: {report['confusion_png']}")
        return 0

    return run


@command("predict", "classify images with a checkpoint (several: their ensemble)")
def _predict(p: argparse.ArgumentParser) -> Handler:
    _checkpoints_arg(p)
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR")
    p.add_argument("--topk", type=arg_type(int, POSITIVE), default=5, help="classes to show (at most all)")
    p.add_argument("--tta", choices=("flip", "10crop"))
    p.add_argument(
        "--strict", action="store_true", help="fail on unreadable or non-image files instead of skipping"
    )
    p.add_argument("--device", default="auto")
    _precision_arg(p)
    p.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from reslab.data import image_loader, list_images
        from reslab.engine import resolve_device
        from reslab.inference import first_batch, load_members, predict
        from reslab.weights import is_checkpoint_path

        # `--checkpoint A.pt B.pt photo.jpg dir/`: the option takes the checkpoint files, the rest are inputs.
        checkpoints = [c for c in args.checkpoint if is_checkpoint_path(c)]
        inputs = [c for c in args.checkpoint if not is_checkpoint_path(c)] + args.inputs
        if not checkpoints or not inputs:
            raise ReslabError("usage: reslab predict --checkpoint CKPT [CKPT ...] IMAGE_OR_DIR [...]")
        device = resolve_device(args.device)
        files = list_images(inputs, args.strict)

        def probe(raw, _first):
            return first_batch(image_loader(files, raw, 64, device=device, strict=args.strict))

        members = load_members(
            checkpoints, args.model, device, args.tta, precision=args.precision, probe=probe
        )
        _say_precision(members.precision)
        results = predict(members, files, args.topk, strict=args.strict)
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
    _precision_arg(p)

    def run(args: argparse.Namespace) -> int:
        from reslab.embed import build_index

        info = build_index(
            args.checkpoint,
            args.inputs,
            args.out,
            model=args.model,
            device=args.device,
            precision=args.precision,
        )
        _say_precision(info["precision"])
        print(
            f"{info['count']} embeddings of dimension {info['dim']}: {info['embeddings']} (files: {info['files']})"
        )
        return 0

    return run


@command("search", "find the indexed images most similar to a query image")
def _search(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--index", required=True, metavar="FILE.npy")
    p.add_argument("queries", nargs="+", metavar="IMAGE")
    p.add_argument("--topk", type=arg_type(int, POSITIVE), default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from reslab.embed import search

        results = search(args.index, args.queries, args.topk, args.device)
        if args.json:
            print(json.dumps(results, indent=1))
            return 0
        for r in results:
            print(r["query"])
            for m in r["matches"]:
                print(f"  {m['similarity']:.4f}  {m['file']}")
        return 0

    return run


def _batch_arg(text: str) -> str | int:
    return text if text == "dynamic" else arg_type(int, POSITIVE)(text)


_batch_arg.constraint = POSITIVE
_positive_ints = int_list(POSITIVE)


@command("export", "export a checkpoint to ONNX / TorchScript / torch.export and verify it on real images")
def _export(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript", "exported"))
    p.add_argument(
        "--batch", type=_batch_arg, default="dynamic", help="dynamic (default) or a fixed batch size"
    )
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the convolutions first")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="fp16: half-precision ONNX")
    p.add_argument("--out", metavar="FILE")
    p.add_argument("--model", help="architecture of a bare state dict")
    p.add_argument(
        "--images", metavar="DIR", help="real images to verify on (default: the checkpoint's test data)"
    )
    p.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from reslab.deploy import real_inputs
        from reslab.deploy.export import FORMATS, export_model
        from reslab.engine import read_checkpoint

        ckpt = read_checkpoint(args.checkpoint, args.model)
        out = args.out or str(Path(args.checkpoint).with_suffix(FORMATS[args.format]))
        report = export_model(
            ckpt,
            args.format,
            out,
            batch=args.batch,
            fold_bn=args.fold_bn,
            verify_inputs=real_inputs(ckpt, args.images, 16),
            precision=args.precision,
        )
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            print(
                f"wrote {report['path']} ({report['bytes'] / 1e6:.1f} MB, batch {args.batch}"
                f"{', BN folded' if args.fold_bn else ''}) + {report['path']}.json"
            )
            print(
                f"verified on {report['verified_on']} real images against the fp32 model"
                + (f" with {report['verified_with']}" if "verified_with" in report else "")
                + f": max abs diff {report['max_abs_diff']:.2e}, top-1 agreement {100 * report['top1_agreement']:.1f}%"
            )
        return 0

    return run


@command(
    "quantize", "int8 post-training quantization (ONNX Runtime) with its accuracy and speed cost measured"
)
def _quantize(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument(
        "--calib", metavar="DIR", help="calibration images (default: the checkpoint's training images)"
    )
    p.add_argument(
        "--calib-n", type=arg_type(int, POSITIVE), default=256, help="number of calibration images"
    )
    p.add_argument("--out", metavar="FILE.int8.onnx")
    p.add_argument("--model", help="architecture of a bare state dict")
    p.add_argument(
        "--min-time", type=arg_type(float, POSITIVE), default=1.5, help="seconds per speed measurement"
    )
    p.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from reslab.deploy.quantize import quantize_report

        r = quantize_report(args.checkpoint, args.out, args.calib, args.calib_n, args.model, args.min_time)
        if args.json:
            print(json.dumps(r, indent=1))
            return 0
        print(
            f"int8 model: {r['int8']} ({r['bytes']['int8'] / 1e6:.2f} MB vs {r['bytes']['fp32'] / 1e6:.2f} MB fp32), "
            f"calibrated on {r['calibration_images']} real images"
        )
        if "int8_top1_err" in r:
            print(
                f"accuracy on {r['test_images']} test images: fp32 top-1 error {_pct(r['fp32_top1_err'])}, "
                f"int8 {_pct(r['int8_top1_err'])} ({100 * (r['int8_top1_err'] - r['fp32_top1_err']):+.2f} points), "
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


@command("bench", "inference speed of every backend and precision, against torchvision in the same run")
def _bench(p: argparse.ArgumentParser) -> Handler:
    from reslab.deploy.bench import BACKENDS, PRECISIONS

    p.add_argument("target", metavar="MODEL_OR_CKPT")
    p.add_argument("--batch", type=_positive_ints, default=[1, 8], help="comma-separated batch sizes")
    p.add_argument(
        "--input-size", type=arg_type(int, POSITIVE), help="square input side (default: the model's)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--backends", help=f"comma-separated: {', '.join(BACKENDS)} (default: all that run here)")
    p.add_argument(
        "--precision",
        help=f"comma-separated: {', '.join(PRECISIONS)} (default: fp32 on CPUs; fp32,bf16,fp16 on CUDA)",
    )
    p.add_argument(
        "--min-time", type=arg_type(float, POSITIVE), default=2.0, help="seconds of timed runs per cell"
    )
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")

    def run(args: argparse.Namespace) -> int:
        from reslab.deploy.bench import bench

        def listed(text: str | None) -> tuple[str, ...] | None:
            return tuple(t for t in (text or "").split(",") if t) or None

        say = None if args.json else (lambda msg: print(f"  ... {msg}", file=sys.stderr, flush=True))
        result = bench(
            args.target,
            batches=tuple(args.batch),
            input_size=args.input_size,
            device=args.device,
            backends=listed(args.backends),
            precisions=listed(args.precision),
            min_time=args.min_time,
            progress=say,
        )
        if args.json:
            print(json.dumps(result["rows"], indent=1))
            return 0
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in result["peak_gflops"].items())
        print(
            f"{result['model']} at {'x'.join(map(str, result['input_size']))} on {result['device']} "
            f"({result['threads']} threads); matmul peaks {peaks} GFLOP/s; "
            f"{result['gflops_per_image']:.2f} GFLOP per image"
        )
        rows = [
            {
                **r,
                "ips": f"{r['img_per_s']:.1f}",
                "p50": f"{r['p50_ms']:.2f}",
                "p90": f"{r['p90_ms']:.2f}",
                "spread": f"{r['spread_pct']:.0f}%",
                "gf": f"{r['gflops_per_s']:.0f}",
                "peak": f"{100 * r['peak_fraction']:.0f}%",
                "agree": f"{r['top1_agree']:.3f}",
                "ratio": f"{r['vs_torchvision']:.2f}x" if r["vs_torchvision"] else "-",
            }
            for r in result["rows"]
        ]
        columns = [("backend", "backend"), ("precision", "precision"), ("batch", "batch"), ("ips", "img/s")]
        columns += [("p50", "p50 ms"), ("p90", "p90 ms"), ("spread", "p90/p50"), ("gf", "GFLOP/s")]
        columns += [("peak", "of its peak"), ("agree", "top-1 = fp32"), ("ratio", "vs torchvision")]
        print(format_table(rows, columns))
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
        from reslab.transfer import FinetunePolicy, finetune_config

        overrides = overrides_from(args)
        data_dir = overrides.pop("data.dir")
        overrides.pop("data.name", None)  # fine-tuning reads a folder
        cfg, ft = finetune_config(
            args.source, data_dir, model=args.model, overrides=overrides, finetune=flag_values(args, FINETUNE)
        )
        print(f"reslab: fine-tuning {cfg.model} from {ft.source} on {data_dir}")
        return _fit_and_report(cfg, policy=FinetunePolicy(ft))

    return run


@command("analyze", "the residual-learning lab: degradation, gradients, responses, landscape, lesion, report")
def _analyze(p: argparse.ArgumentParser) -> Handler:
    from reslab.analysis import STUDIES

    studies = p.add_subparsers(dest="study", metavar="STUDY", required=True, parser_class=Parser)
    for name, module in STUDIES.items():
        sp = studies.add_parser(name, help=module.HELP, description=module.HELP)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        module.add_arguments(sp)

    def run(args: argparse.Namespace) -> int:
        result = STUDIES[args.study].main(args)
        if "report" in result:
            print(f"report: {result['report']}")
            return 0
        print(Path(result["out"], "summary.md").read_text())
        print(f"study folder: {result['out']}")
        return 0

    return run


# --- the entry point ----------------------------------------------------------------------------


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand listed and only ``only`` configured (its arguments added)."""
    common = Parser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors"
    )
    parser = Parser(
        prog="reslab",
        description="Deep residual networks: models, training, analysis, deployment.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, help, configure in _COMMANDS:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        if only == name:
            p.set_defaults(func=configure(p))
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """reslab's own warnings as one ``reslab: warning:`` line; others as Python prints them."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        print(f"reslab: warning: {message}", file=file or sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error (already printed on one line)
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    warnings.showwarning = _show_warning
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # inside the try: a reader that went away is noticed here
        return code
    except ReslabError as e:
        if debug:
            raise
        print(f"reslab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reslab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `reslab models | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return PIPE_CLOSED
    except OSError as e:  # a file or folder the user named: say which and why
        if debug:
            raise
        where = e.filename or "a file"
        reason = (
            "a file where a folder is needed" if isinstance(e, FileExistsError | NotADirectoryError) else None
        )
        print(
            f"reslab: error: {where}: {reason or e.strerror or e}; check the path and its permissions",
            file=sys.stderr,
        )
        return 2
    except Exception as e:  # a bug or an environment problem: still one line unless --debug
        if debug:
            raise
        msg = (str(e).strip().splitlines() or [""])[0]
        print(
            f"reslab: error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        warnings.showwarning = _default_showwarning
