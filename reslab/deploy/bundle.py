"""A deployment bundle: one folder a phone or board app can ship, with nothing of reslab in it.

``DIR/`` holds the model file(s) (fp32, and int8 when asked), ``preprocess.json`` (size, resize,
interpolation, mean, std, channels), ``labels.txt``, a model card (``README.md``: architecture,
parameters, multiply-adds, accuracy per file, source checkpoint, calibration data, the command),
``bundle.json`` (the same facts for programs) and ``predict.py``, a runner that imports only the
format's runtime, NumPy and PIL and prints an image's top classes by name. The bundle is built in
a temporary folder, every file verified, and only then moved into place.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from reslab.complexity import count_macs, count_params
from reslab.config import json_text
from reslab.deploy.export import FORMATS, export_model
from reslab.deploy.quantize import calibration_images, compare_on_test
from reslab.engine import Checkpoint
from reslab.errors import ReslabError
from reslab.weights import file_kind, publish

RUNTIMES = {"pte": "executorch", "onnx": "onnxruntime"}  # what predict.py imports per format


def write_bundle(
    ckpt: Checkpoint,
    fmt: str,
    folder: str | os.PathLike,
    *,
    verify_inputs: torch.Tensor,
    quantize: str | None = None,
    calib: str | None = None,
    calib_n: int = 256,
    test_limit: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export ``ckpt`` in ``fmt`` (and int8 with ``quantize``) into the bundle ``folder``; returns
    the bundle's facts (``bundle.json``). A folder that is not an earlier bundle is refused unless
    ``overwrite``; a failure leaves whatever was there."""
    if fmt not in RUNTIMES:
        raise ReslabError(f"--bundle: a bundle's runner runs {' or '.join(RUNTIMES)} files, not {fmt}")
    folder = Path(folder)
    if folder.exists() and not overwrite and file_kind(folder) not in ("reslab bundle", "folder"):
        raise ReslabError(f"{folder} holds a {file_kind(folder)}; choose another --bundle folder")
    if folder.exists() and not overwrite and file_kind(folder) == "folder" and any(folder.iterdir()):
        raise ReslabError(
            f"{folder} is a folder of other files; choose another --bundle folder or pass --overwrite"
        )
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        files: dict[str, tuple[Path, str]] = {}
        reports = {}
        suffix = FORMATS[fmt].suffix
        fp32 = tmp / f"model{suffix}"
        reports["fp32"] = export_model(ckpt, fmt, fp32, verify_inputs=verify_inputs)
        files["fp32"] = (fp32, fmt)
        calibration = None
        if quantize:
            calibration = calibration_images(ckpt, calib, calib_n)
            int8 = tmp / f"model-int8{suffix}"
            reports["int8"] = export_model(
                ckpt, fmt, int8, verify_inputs=verify_inputs, quantize=quantize, calibration=calibration
            )
            files["int8"] = (int8, fmt)
        compared = compare_on_test(ckpt, files, test_limit)
        facts = _facts(ckpt, fmt, reports, compared, calibration, calib)
        pre = ckpt.preprocess
        (tmp / "preprocess.json").write_text(
            json_text(
                {
                    "size": list(pre.size),
                    "resize": pre.resize,
                    "interpolation": pre.interpolation,
                    "mean": list(pre.mean),
                    "std": list(pre.std),
                    "channels": pre.channels,
                    "layout": "NCHW float32",
                    "batch": reports["fp32"]["batch"],
                }
            )
        )
        (tmp / "labels.txt").write_text("".join(f"{c}\n" for c in ckpt.classes))
        (tmp / "bundle.json").write_text(json_text(facts))
        (tmp / "README.md").write_text(_card(facts))
        (tmp / "predict.py").write_text(
            RUNNER.replace("{RUNTIME}", RUNTIMES[fmt]).replace("{MODEL}", fp32.name)
        )
        for path in tmp.glob("*.json"):  # the per-file sidecars are folded into bundle.json
            if path.name.startswith("model"):
                path.unlink()
        publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return facts


def _facts(
    ckpt: Checkpoint,
    fmt: str,
    reports: dict[str, dict],
    compared: dict,
    calibration: torch.Tensor | None,
    calib: str | None,
) -> dict[str, Any]:
    pre = ckpt.preprocess
    model = ckpt.model.cpu()
    return {
        "arch": ckpt.arch,
        "params": count_params(model),
        "gmacs": count_macs(model, (1, pre.channels, *pre.size)) / 1e9,
        "classes": len(ckpt.classes),
        "format": fmt,
        "runtime": RUNTIMES[fmt],
        "files": {
            precision: {
                "file": Path(r["path"]).name,
                "bytes": r["bytes"],
                "batch": r["batch"],
                "verified": {
                    k: r.get(k) for k in ("verified_on", "max_abs_diff", "top1_agreement", "verified_with")
                },
                **compared.get(precision, {}),
            }
            for precision, r in reports.items()
        },
        "test": {k: v for k, v in compared.items() if k in ("test_images", "split", "pytorch-fp32")},
        "source": str(Path(ckpt.path).resolve()),
        "calibration": None
        if calibration is None
        else {"images": len(calibration), "from": calib or "the checkpoint's training images"},
        "command": " ".join(["reslab", *sys.argv[1:]]) if sys.argv and "reslab" in sys.argv[0] else None,
    }


def _card(f: dict[str, Any]) -> str:
    rows = []
    for precision, info in f["files"].items():
        err = info.get("top1_err")
        rows.append(
            f"| `{info['file']}` | {precision} | {info['bytes'] / 1e6:.2f} MB | "
            + (f"{100 * err:.2f}%" if err is not None else "not measured")
            + f" | {100 * info['verified']['top1_agreement']:.1f}% |"
        )
    test = f["test"]
    pytorch = test.get("pytorch-fp32", {}).get("top1_err")
    where = f"{test['test_images']} images of its test split" if test else "no recorded test data"
    calib = f["calibration"]
    return "\n".join(
        [
            f"# {f['arch']} for {f['runtime']}",
            "",
            f"A {f['classes']}-class image classifier: {f['arch']}, {f['params'] / 1e6:.2f}M parameters, "
            f"{f['gmacs']:.3f} GMACs (multiply-adds) per image.",
            "",
            "| file | precision | size | top-1 error | top-1 = PyTorch fp32 (verification images) |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Accuracy measured on {where}"
            + (
                f"; the PyTorch fp32 model: {100 * pytorch:.2f}% top-1 error." if pytorch is not None else "."
            ),
            f"Source checkpoint: `{f['source']}`.",
            f"Calibration: {calib['images']} real images from {calib['from']}." if calib else "",
            f"Made with: `{f['command']}`" if f["command"] else "",
            "",
            "Run it: `python predict.py IMAGE [--top 5]` (needs only "
            f"`{f['runtime']}`, NumPy and Pillow). Inputs: `preprocess.json`; class names: `labels.txt`.",
            "",
        ]
    )


RUNNER = '''"""Classify an image with this bundle's model. Needs {RUNTIME}, NumPy and Pillow; not reslab.

    python predict.py IMAGE [--top 5] [--model FILE]
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def preprocess(path, pre):
    """The image as the model was trained to see it: resized (the shorter side to `resize`, then
    the central crop; or the whole image to `size`), scaled to [0, 1], normalised, NCHW."""
    image = Image.open(path).convert("L" if pre["channels"] == 1 else "RGB")
    height, width = pre["size"]
    method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[pre["interpolation"]]
    if pre["resize"]:
        scale = pre["resize"] / min(image.size)
        image = image.resize((max(pre["resize"], int(image.size[0] * scale)), max(pre["resize"], int(image.size[1] * scale))), method)
        left, top = round((image.size[0] - width) / 2), round((image.size[1] - height) / 2)
        image = image.crop((left, top, left + width, top + height))
    else:
        image = image.resize((width, height), method)
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = x[:, :, None] if x.ndim == 2 else x
    x = (x - np.array(pre["mean"], dtype=np.float32)) / np.array(pre["std"], dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def run(model, x, batch):
    x = np.repeat(x, batch, axis=0)  # the program's fixed batch: the image, repeated
    if "{RUNTIME}" == "executorch":
        import torch
        from executorch.runtime import Runtime

        method = Runtime.get().load_program(str(model)).load_method("forward")
        return method.execute([torch.from_numpy(x)])[0].numpy()[0]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0][0]


def main():
    p = argparse.ArgumentParser(description="classify an image")
    p.add_argument("image")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--model", default=str(HERE / "{MODEL}"))
    args = p.parse_args()
    pre = json.loads((HERE / "preprocess.json").read_text())
    labels = (HERE / "labels.txt").read_text().splitlines()
    logits = run(args.model, preprocess(args.image, pre), pre["batch"] if isinstance(pre["batch"], int) else 1)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    for i in np.argsort(-probs)[: args.top]:
        print(f"{labels[i]}\\t{probs[i]:.4f}")


if __name__ == "__main__":
    main()
'''
