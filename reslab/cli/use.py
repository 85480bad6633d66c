"""Commands that use trained models: ``eval``, ``predict``, ``embed``, ``search``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from reslab.cli.options import (
    Handler,
    add_checkpoints,
    add_data_options,
    add_model_option,
    add_overwrite,
    add_precision,
    command,
    format_table,
    pct,
)
from reslab.config import POSITIVE, TTAMode, add_device_option, arg_type, choices, json_text
from reslab.errors import ReslabError


def say_precision(chosen: dict[str, Any]) -> None:
    """One stderr line on the precision used, when it is not plain fp32 or not the one asked for:
    how it was chosen and how its predictions agree with fp32's."""
    if chosen["precision"] == "fp32" and "asked" not in chosen:
        return
    how = (
        " (auto: " + ", ".join(f"{k} {v:.2f} ms" for k, v in chosen["ms_per_batch"].items()) + " per batch)"
        if "ms_per_batch" in chosen
        else ""
    )
    if "asked" in chosen:
        how = f" ({chosen['asked']} asked: {chosen['why']})"
    agree = (
        f"; top-1 agreement with fp32 {100 * chosen['top1_agreement_with_fp32']:.1f}% on {chosen['agreement_images']} images"
        if "top1_agreement_with_fp32" in chosen
        else ""
    )
    print(f"reslab: precision {chosen['precision']}{how}{agree}", file=sys.stderr)


def _add_tta(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", choices=choices(TTAMode), help="test-time augmentation")


@command(
    "eval", "evaluate checkpoints (several: an ensemble): top-1/top-5 error, per-class accuracy, confusion"
)
def _eval(p: argparse.ArgumentParser) -> Handler:
    add_checkpoints(p)
    add_data_options(p)
    _add_tta(p)
    p.add_argument("--out", metavar="DIR", help="where to write eval.json and confusion.png")
    p.add_argument(
        "--classes-by-index",
        action="store_true",
        help="data whose class folders are named otherwise: match classes by position",
    )
    add_device_option(p)
    add_precision(p)
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
            by_index=args.classes_by_index,
        )
        if args.json:
            print(json_text(report))
            return 0
        say_precision(report["precision"])
        if ensemble:
            for m in report["members"]:
                print(f"member {m['checkpoint']} ({m['arch']}): top-1 error {pct(m['err'])}")
        label = "ensemble" if ensemble else report["arch"]
        top5 = f", top-5 error {pct(report['top5_err'])}" if report["top5_err"] is not None else ""
        print(
            f"{label} on {report['data']} {report['split']} ({report['n']} images"
            f"{', ' + args.tta + ' TTA' if args.tta else ''}): top-1 error {pct(report['top1_err'])}"
            f"{top5}, loss {report['loss']:.4f}"
        )
        rows = [{"cls": c, "acc": f"{100 * a:.1f}%"} for c, a in report["per_class_acc"].items()]
        print(format_table(rows, [("cls", "class"), ("acc", "accuracy")]))
        print(f"confusion matrix: {report['confusion_png']}")
        return 0

    return run


@command("predict", "classify images with a checkpoint (several: their ensemble)")
def _predict(p: argparse.ArgumentParser) -> Handler:
    add_checkpoints(p)
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR")
    p.add_argument("--topk", type=arg_type(int, POSITIVE), default=5, help="classes to show (at most all)")
    _add_tta(p)
    p.add_argument(
        "--strict", action="store_true", help="fail on unreadable or non-image files instead of skipping"
    )
    add_device_option(p)
    add_precision(p)
    p.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from reslab.data import first_batch, image_loader, list_images
        from reslab.engine import resolve_device
        from reslab.inference import load_members, predict
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
        say_precision(members.precision)
        results = predict(members, files, args.topk, strict=args.strict)
        if args.json:
            print(json_text(results))
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
    add_overwrite(p)
    add_model_option(p)
    add_device_option(p)
    add_precision(p)

    def run(args: argparse.Namespace) -> int:
        from reslab.embed import build_index

        info = build_index(
            args.checkpoint,
            args.inputs,
            args.out,
            model=args.model,
            device=args.device,
            precision=args.precision,
            overwrite=args.overwrite,
        )
        say_precision(info["precision"])
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
    add_device_option(p)
    p.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from reslab.embed import search

        results = search(args.index, args.queries, args.topk, args.device)
        if args.json:
            print(json_text(results))
            return 0
        for r in results:
            print(r["query"])
            for m in r["matches"]:
                print(f"  {m['similarity']:.4f}  {m['file']}")
        return 0

    return run
