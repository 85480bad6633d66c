"""Deployment commands: ``export``, ``quantize``, ``bench``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reslab.cli.options import Handler, add_model_option, add_overwrite, command, format_table, pct
from reslab.config import (
    POSITIVE,
    ExportFormat,
    ExportPrecision,
    Quantize,
    add_device_option,
    arg_type,
    choices,
    int_list,
    json_text,
)
from reslab.errors import ReslabError


def _batch_arg(text: str) -> str | int:
    return text if text == "dynamic" else arg_type(int, POSITIVE)(text)


_batch_arg.constraint = POSITIVE
_positive_ints = int_list(POSITIVE)


@command("export", "export a checkpoint (ONNX, TorchScript, torch.export, ExecuTorch, Core ML) and verify it")
def _export(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument("--format", required=True, choices=choices(ExportFormat))
    p.add_argument(
        "--batch",
        type=_batch_arg,
        help="dynamic or a fixed batch size (default: dynamic; 1 for pte and coreml)",
    )
    p.add_argument(
        "--fold-bn", action="store_true", help="fold BatchNorm into the convolutions (pte, coreml: always)"
    )
    p.add_argument(
        "--precision",
        choices=choices(ExportPrecision),
        help="fp16: half-precision ONNX or Core ML (coreml's default)",
    )
    p.add_argument(
        "--quantize", choices=choices(Quantize), help="int8 (onnx, pte): static, per-channel weights"
    )
    p.add_argument(
        "--calib", metavar="DIR", help="calibration images (default: the checkpoint's training images)"
    )
    p.add_argument(
        "--calib-n", type=arg_type(int, POSITIVE), default=256, help="number of calibration images"
    )
    p.add_argument("--out", metavar="FILE")
    p.add_argument(
        "--bundle",
        metavar="DIR",
        help="write a deployment folder: model(s), preprocess.json, labels, card, predict.py",
    )
    p.add_argument(
        "--test-limit",
        type=arg_type(int, POSITIVE),
        help="test images for the accuracy report (default: all)",
    )
    add_overwrite(p)
    add_model_option(p)
    p.add_argument(
        "--images", metavar="DIR", help="real images to verify on (default: the checkpoint's test data)"
    )
    p.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from reslab.deploy import real_inputs
        from reslab.deploy.bundle import write_bundle
        from reslab.deploy.edge import coreml_can_predict
        from reslab.deploy.export import FORMATS, default_output, export_model
        from reslab.deploy.quantize import calibration_images, compare_on_test
        from reslab.engine import read_checkpoint

        ckpt = read_checkpoint(args.checkpoint, args.model, device="cpu")
        # Core ML packages are checked by their spec where Core ML cannot run them (off macOS)
        needs_images = args.format != "coreml" or coreml_can_predict() or args.bundle
        verify = real_inputs(ckpt, args.images, 16) if needs_images or args.images else None
        if args.bundle:
            if args.out:
                raise ReslabError("--bundle writes its own files (model.pte, ...): drop --out")
            facts = write_bundle(
                ckpt, args.format, args.bundle, verify_inputs=verify, quantize=args.quantize,
                calib=args.calib, calib_n=args.calib_n, test_limit=args.test_limit, overwrite=args.overwrite,
            )  # fmt: skip
            if args.json:
                print(json_text(facts))
                return 0
            print(
                f"wrote the bundle {args.bundle}: {', '.join(sorted(p.name for p in Path(args.bundle).iterdir()))}"
            )
            for precision, info in facts["files"].items():
                print(_file_line(precision, info))
            return 0
        out = args.out or default_output(args.checkpoint, FORMATS[args.format].suffix)
        calibration = calibration_images(ckpt, args.calib, args.calib_n) if args.quantize else None
        report = export_model(
            ckpt, args.format, out, batch=args.batch, fold_bn=args.fold_bn, verify_inputs=verify,
            precision=args.precision, quantize=args.quantize, calibration=calibration, overwrite=args.overwrite,
        )  # fmt: skip
        if args.quantize:  # what int8 costs, on the real test split
            report["accuracy"] = compare_on_test(ckpt, {"int8": (Path(out), args.format)}, args.test_limit)
        if args.json:
            print(json_text(report))
            return 0
        print(
            f"wrote {report['path']} ({report['bytes'] / 1e6:.2f} MB, {report['precision']}, batch {report['batch']}"
            f"{', BN folded' if report['folded_bn'] else ''}) + {report['path']}.json"
        )
        if "top1_agreement" in report and "verified_on" in report:
            print(
                f"verified on {report['verified_on']} real images with {report['verified_with']}: max abs diff "
                f"{report['max_abs_diff']:.2e}, top-1 agreement with fp32 {100 * report['top1_agreement']:.1f}%"
            )
        if "coreml" in report:
            spec = report["coreml"]
            print(
                f"checked the package's spec: input {spec['input']} ({spec['color']} {'x'.join(map(str, spec['input_size']))}), "
                f"outputs {', '.join(spec['outputs'])}, {spec['conv_precision']}, {spec['ops']} ops; "
                + (
                    "predictions agree"
                    if report["predicted"]
                    else "prediction not checked: Core ML runs on macOS only"
                )
            )
        accuracy = report.get("accuracy") or {}
        if accuracy:
            print(
                f"on {accuracy['test_images']} test images: top-1 error fp32 (PyTorch) "
                f"{pct(accuracy['pytorch-fp32']['top1_err'])}, int8 {pct(accuracy['int8']['top1_err'])}"
            )
        return 0

    return run


def _file_line(precision: str, info: dict) -> str:
    err = info.get("top1_err")
    measured = f", top-1 error {pct(err)}" if err is not None else ""
    return f"  {info['file']}: {precision}, {info['bytes'] / 1e6:.2f} MB{measured}"


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
    add_overwrite(p)
    add_model_option(p)
    p.add_argument(
        "--min-time", type=arg_type(float, POSITIVE), default=1.5, help="seconds per speed measurement"
    )
    p.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from reslab.deploy.quantize import quantize_report

        r = quantize_report(
            args.checkpoint, args.out, args.calib, args.calib_n, args.model, args.min_time, args.overwrite
        )
        if args.json:
            print(json_text(r))
            return 0
        print(
            f"int8 model: {r['int8']} ({r['bytes']['int8'] / 1e6:.2f} MB vs {r['bytes']['fp32'] / 1e6:.2f} MB fp32), "
            f"calibrated on {r['calibration_images']} real images"
        )
        if "int8_top1_err" in r:
            print(
                f"accuracy on {r['test_images']} test images: fp32 top-1 error {pct(r['fp32_top1_err'])}, "
                f"int8 {pct(r['int8_top1_err'])} ({100 * (r['int8_top1_err'] - r['fp32_top1_err']):+.2f} points), "
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
    add_device_option(p)
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
            print(json_text(result["rows"]))
            return 0
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in result["peak_gflops"].items())
        print(
            f"{result['model']} at {'x'.join(map(str, result['input_size']))} on {result['device']} "
            f"({result['threads']} threads); matmul peaks {peaks} GFLOP/s; "
            f"{result['gflops_per_image']:.2f} GFLOP per image (2 per multiply-add)"
        )
        if result["peak_raised_to_fastest_row"]:
            print(
                f"(the {', '.join(result['peak_raised_to_fastest_row'])} peak is the fastest row's: "
                "the matmul measurement ran lower)"
            )
        rows = [
            {
                **r,
                "ips": f"{r['img_per_s']:.1f}",
                "p50": f"{r['p50_ms']:.2f}",
                "p90": f"{r['p90_ms']:.2f}",
                "spread": f"+{r['spread_pct']:.0f}%",
                "gf": f"{r['gflops_per_s']:.0f}",
                "peak": f"{100 * r['peak_fraction']:.0f}%",
                "agree": f"{r['top1_agree']:.3f}",
                "ratio": f"{r['vs_torchvision']:.2f}x" if r["vs_torchvision"] else "-",
            }
            for r in result["rows"]
        ]
        columns = [("backend", "backend"), ("precision", "precision"), ("tf32", "TF32"), ("batch", "batch")]
        columns += [("ips", "img/s"), ("p50", "p50 ms"), ("p90", "p90 ms"), ("spread", "p90 over p50")]
        columns += [("gf", "GFLOP/s"), ("peak", "of its peak"), ("agree", "top-1 = fp32")]
        columns += [("ratio", "vs torchvision")]
        print(format_table(rows, columns))
        return 0

    return run


@command("push", "share a trained model on the Hugging Face Hub (timm's layout, with a model card)")
def _push(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("source", metavar="RUN_DIR_OR_CKPT")
    p.add_argument("--repo", required=True, metavar="ORG/NAME")
    p.add_argument("--private", action="store_true", help="a private repository")
    p.add_argument("--revision", metavar="BRANCH", help="upload to this branch (created if needed)")
    p.add_argument("--license", default="apache-2.0", help="the card's license (default apache-2.0)")
    p.add_argument(
        "--local-dir", metavar="DIR", help="write the folder here and upload nothing (to look at it first)"
    )

    def run(args: argparse.Namespace) -> int:
        from reslab.deploy.share import push

        result = push(
            args.source, args.repo, private=args.private, revision=args.revision, license=args.license,
            local_dir=args.local_dir,
        )  # fmt: skip
        if result["uploaded"]:
            print(f"pushed {args.source} to {result['repo']}: {result['url']}")
        else:
            print(f"wrote {result['folder']} (not uploaded): model.safetensors, config.json, README.md")
        return 0

    return run
