"""Export a checkpoint (ONNX, TorchScript, ``torch.export``, ExecuTorch, Core ML) and verify the result.

Every export is written under a temporary name, checked there on real images, and only then
renamed into place: ONNX runs in ONNX Runtime, ExecuTorch programs in ExecuTorch's runtime,
TorchScript and ``torch.export`` programs in PyTorch, each against the PyTorch model; a Core ML
package is checked by reading its spec back (and by prediction where macOS runs it). A mismatch
fails and leaves whatever was at the output path as it was. Class names and preprocessing travel
with the file (ONNX metadata, an extra file in TorchScript/``.pt2`` archives, the Core ML spec) and
in a JSON sidecar for all.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.config import json_text
from reslab.deploy import edge
from reslab.deploy.fold import fold_batchnorm
from reslab.deploy.onnx import ort_session, quantize_onnx, write_onnx
from reslab.engine import Checkpoint
from reslab.errors import ReslabError
from reslab.hub import is_hub_name
from reslab.weights import guard_output, publish

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
# How far an export may stray from its reference, relative to the largest logit: float32 rounding,
# half precision's 11 significant bits through a deep network, or int8 kernels against PyTorch's
# simulation of the same quantized arithmetic.
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 1e-1}
INT8_AGREEMENT = 0.9  # int8's top-1 agreement with fp32 on the verification images, at least


@dataclass(frozen=True)
class Format:
    """What reslab writes for one ``--format``."""

    suffix: str
    kind: str  # what reslab.weights.file_kind calls the written file
    precisions: tuple[str, ...] = ("fp32",)
    quantizable: bool = False  # takes --quantize int8
    fixed_batch: bool = False  # no dynamic batch (devices run one fixed shape)
    folds_bn: bool = False  # BatchNorm always folded


FORMATS = {
    "onnx": Format(".onnx", "ONNX model", ("fp32", "fp16"), quantizable=True),
    "torchscript": Format(".torchscript.pt", "TorchScript module"),
    "exported": Format(".pt2", "torch.export program"),
    "pte": Format(".pte", "ExecuTorch program", quantizable=True, fixed_batch=True, folds_bn=True),
    "coreml": Format(".mlpackage", "Core ML package", ("fp16", "fp32"), fixed_batch=True, folds_bn=True),
}


def _metadata(ckpt: Checkpoint, fmt: str, batch: str | int, folded: bool, precision: str) -> dict[str, Any]:
    dtype = "float16" if precision == "fp16" else "float32"
    return {
        "arch": ckpt.arch,
        "classes": ckpt.classes,
        "preprocess": ckpt.preprocess.to_dict(),
        "format": fmt,
        "batch": batch,
        "folded_bn": folded,
        "precision": precision,
        "input": "an RGB image (the normalisation inside)"
        if fmt == "coreml"
        else f"{dtype} NCHW, preprocessed as 'preprocess' says",
    }


def default_output(source: str, suffix: str) -> str:
    """Where an export of ``source`` goes by default: beside a checkpoint file (``best.pt`` ->
    ``best.onnx``), in this folder for weights by name (``hf-hub:timm/resnet50.a1_in1k`` ->
    ``timm_resnet50.a1_in1k.onnx``)."""
    if is_hub_name(source):
        return source.split(":", 1)[1].strip("/").replace("/", "_").replace("@", "_") + suffix
    return str(Path(source).with_suffix(suffix))


def runner(path: Path, fmt: str, gpu: bool = False):
    """A function running an exported file the way a deployment would load it: ONNX Runtime (its
    CUDA provider for half precision where it has one), ExecuTorch's runtime, or PyTorch."""
    if fmt == "onnx":
        session = ort_session(path, gpu=gpu)
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]).float()
    if fmt == "pte":
        return edge.pte_runner(path)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path))
    with open(path, "rb") as f:  # a file object: torch.export warns about names not ending in .pt2
        return torch.export.load(f).module()


def run_exported(path: Path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """An exported file's outputs on ``x``."""
    return runner(path, fmt, gpu=x.dtype == torch.float16)(x).float()


def export_model(
    ckpt: Checkpoint,
    fmt: str,
    out: str | os.PathLike,
    *,
    batch: str | int | None = None,
    fold_bn: bool = False,
    verify_inputs: torch.Tensor | None = None,
    precision: str | None = None,
    quantize: str | None = None,
    calibration: torch.Tensor | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a checkpoint's model in ``fmt`` to ``out`` (+ ``out.json``) and verify it on
    ``verify_inputs`` (real images) against the PyTorch model.

    ``batch``: ``dynamic`` (the default where the format allows it) or a fixed size (default 1 for
    device formats). ``precision``: fp16 writes half-precision ONNX or Core ML (Core ML's default).
    ``quantize="int8"`` (ONNX, ExecuTorch) quantizes statically with per-channel weights, the
    activation ranges observed on ``calibration`` (real images). ``out`` is never the checkpoint
    itself, nor a file of another kind (unless ``overwrite``); a failed export or verification
    leaves what was there.
    """
    spec = FORMATS.get(fmt)
    if spec is None:
        raise ReslabError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    precision = precision or spec.precisions[0]
    if precision not in spec.precisions:
        raise ReslabError(f"--precision {precision}: {fmt} is written in {' or '.join(spec.precisions)}")
    if quantize is not None and (quantize != "int8" or not spec.quantizable):
        takes = ", ".join(f for f, s in FORMATS.items() if s.quantizable)
        raise ReslabError(f"--quantize {quantize}: int8 is written for {takes}, not {fmt}")
    if quantize is not None and precision != "fp32":
        raise ReslabError("--quantize int8 starts from the fp32 model; drop --precision")
    batch = batch if batch is not None else (1 if spec.fixed_batch else "dynamic")
    dynamic = batch == "dynamic"
    if dynamic and spec.fixed_batch:
        raise ReslabError(
            f"--batch dynamic: a {fmt} program runs one fixed batch size on the device; give --batch N (default 1)"
        )
    if not dynamic and (not isinstance(batch, int) or batch < 1):
        raise ReslabError(f"--batch {batch!r}: 'dynamic' or a positive number")
    path = guard_output(out, spec.kind, inputs=(ckpt.path,), overwrite=overwrite)
    sidecar = guard_output(f"{path}.json", "JSON", inputs=(ckpt.path,), overwrite=overwrite)
    fold_bn = fold_bn or spec.folds_bn
    model = ckpt.model.eval().cpu().float().to(memory_format=torch.contiguous_format)
    deployed = fold_batchnorm(model) if fold_bn else copy.deepcopy(model)
    if spec.folds_bn:
        edge.decompose_batchnorm(deployed)  # what folding cannot remove (pre-activation nets)
    shape = (2 if dynamic else batch, ckpt.preprocess.channels, *ckpt.preprocess.size)
    reference = model
    if quantize:
        calibration = _check_calibration(calibration, shape[1:])
        deployed = _quantized(fmt, deployed, calibration)
        reference = deployed if fmt == "pte" else model  # PT2E simulates its int8 arithmetic in PyTorch
    else:
        deployed = deployed.to(PRECISIONS.get(precision, torch.float32) if fmt != "coreml" else torch.float32)
    example = torch.randn(
        shape, dtype=PRECISIONS[precision] if fmt in ("onnx", "torchscript", "exported") else torch.float32
    )
    metadata = _metadata(ckpt, fmt, batch, fold_bn, quantize or precision)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(
                fmt,
                deployed,
                example,
                tmp,
                dynamic,
                metadata,
                ckpt,
                precision,
                calibration if quantize else None,
            )
        except (OSError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "inline_container" not in str(e) and "file" not in str(e):
                raise  # an exporter failure, not a file problem
            reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
            raise ReslabError(f"{path}: cannot be written ({reason}); choose a writable --out") from None
        report = {
            "path": str(path),
            "format": fmt,
            "bytes": _size(tmp),
            "batch": batch,
            "folded_bn": fold_bn,
            "precision": quantize or precision,
        }
        if fmt == "coreml":
            report.update(_check_coreml(tmp, ckpt, precision, verify_inputs, path))
        elif verify_inputs is not None:
            report.update(
                _verify(model, reference, tmp, fmt, verify_inputs, batch, quantize or precision, path)
            )
        sidecar.write_text(json_text(metadata))
        publish(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return report


def _check_calibration(calibration: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    if calibration is None or not len(calibration):
        raise ReslabError(
            "--quantize int8 needs calibration images (the run's training data, or --calib DIR)"
        )
    if tuple(calibration.shape[1:]) != tuple(shape):
        raise ReslabError(
            f"calibration images of shape {tuple(calibration.shape[1:])} do not fit the model's input "
            f"{tuple(shape)} (channels, size); use images preprocessed as the checkpoint says"
        )
    return calibration.float().cpu().contiguous()


def _quantized(fmt: str, model: nn.Module, calibration: torch.Tensor) -> nn.Module:
    """The model ready to be written as int8: quantized by PT2E for ExecuTorch; for ONNX the fp32
    model, which ONNX Runtime quantizes after export (:func:`reslab.deploy.quantize.quantize_onnx`)."""
    return edge.quantize_pt2e(model, calibration) if fmt == "pte" else model


def _write(
    fmt: str,
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    dynamic: bool,
    metadata: dict,
    ckpt: Checkpoint,
    precision: str,
    calibration: torch.Tensor | None,
) -> None:
    with torch.no_grad():
        if fmt == "onnx":
            if calibration is None:
                write_onnx(model, example, path, dynamic, metadata)
            else:
                fp32 = path.with_name(path.name + ".fp32.onnx")
                try:
                    write_onnx(model, example, fp32, dynamic, metadata)
                    quantize_onnx(fp32, path, calibration)
                finally:
                    fp32.unlink(missing_ok=True)
        elif fmt == "pte":
            edge.write_pte(model, example, path)
        elif fmt == "coreml":
            edge.write_coreml(model, ckpt.preprocess, path, precision, batch=example.shape[0])
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(model, example)
            traced.save(str(path), _extra_files={"reslab.json": json.dumps(metadata)})
        else:
            shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
            program = torch.export.export(model, (example,), dynamic_shapes=shapes)
            with open(path, "wb") as f:  # as in runner: any file name
                torch.export.save(program, f, extra_files={"reslab.json": json.dumps(metadata)})


def _verify(
    model: nn.Module,
    reference: nn.Module,
    file: Path,
    fmt: str,
    inputs: torch.Tensor,
    batch: str | int,
    precision: str,
    name: Path,
) -> dict[str, Any]:
    """Run the written ``file`` on real ``inputs`` against ``reference`` (the fp32 PyTorch model,
    or for ExecuTorch int8 PyTorch's simulation of its quantized arithmetic) and its top-1 against
    the fp32 model's; raise on a mismatch."""
    dtype = PRECISIONS.get(precision, torch.float32)
    x = inputs.cpu().float()
    if isinstance(batch, int) and fmt != "pte":  # other fixed-batch files take exactly that batch
        x = x.repeat(-(-batch // len(x)), *[1] * (x.ndim - 1))[:batch]
    with torch.no_grad():
        fp32 = model(x)
        ref = reference(x) if reference is not model else fp32
        got = run_exported(file, fmt, x.to(dtype))
    diff = (got - ref).abs().max().item()
    agree = (got.argmax(1) == fp32.argmax(1)).float().mean().item()
    tol = TOLERANCE[precision] * max(1.0, ref.abs().max().item())
    report = {"verified_on": len(x), "max_abs_diff": diff, "top1_agreement": agree, "tolerance": tol}
    report["verified_with"] = {
        "onnx": lambda: ort_session(file, gpu=dtype == torch.float16).get_providers()[0],
        "pte": lambda: "ExecuTorch runtime (XNNPACK)",
    }.get(fmt, lambda: "PyTorch")()
    # half precision may swap near-tied logits (the tolerance is the test); int8 ONNX has no PyTorch
    # twin to compare with, so its agreement with fp32 is
    checks = {"fp32": diff <= tol and agree == 1.0, "fp16": diff <= tol}
    checks["int8"] = agree >= INT8_AGREEMENT and (fmt != "pte" or diff <= tol)
    if not checks[precision]:
        raise ReslabError(
            f"{name}: verification failed: max abs diff {diff:.3g} (tolerance {tol:.3g}), "
            f"top-1 agreement with fp32 {100 * agree:.1f}% on {len(x)} images; nothing was written"
        )
    return report


def _check_coreml(
    file: Path, ckpt: Checkpoint, precision: str, inputs: torch.Tensor | None, name: Path
) -> dict[str, Any]:
    """A Core ML package read back: an image input of the model's size and colour, the class label
    and probabilities out, in the precision asked for; and where macOS runs it, its predictions."""
    spec = edge.inspect_coreml(file)
    pre = ckpt.preprocess
    expected = {
        "input_type": "imageType",
        "input_size": list(pre.size),
        "color": "GRAYSCALE" if pre.channels == 1 else "RGB",
        "conv_precision": precision,
        "predicted": "classLabel",
    }
    wrong = {k: (spec[k], v) for k, v in expected.items() if spec[k] != v}
    if wrong or not spec["ops"]:
        raise ReslabError(f"{name}: the Core ML package is not what was asked: {wrong}; nothing was written")
    report = {"coreml": spec, "verified_with": "the package's spec (coremltools)", "predicted": False}
    if edge.coreml_can_predict() and inputs is not None:  # macOS: the package runs
        report.update(_coreml_predictions(file, ckpt, inputs, name))
    return report


def _coreml_predictions(file: Path, ckpt: Checkpoint, inputs: torch.Tensor, name: Path) -> dict[str, Any]:
    from PIL import Image

    pre = ckpt.preprocess
    predict = edge.coreml_runner(file)
    mean = torch.tensor(pre.mean).view(-1, 1, 1)
    std = torch.tensor(pre.std).view(-1, 1, 1)
    agree = 0
    for x in inputs:
        pixels = ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
        image = Image.fromarray(pixels.permute(1, 2, 0).squeeze(-1).numpy())
        probs = predict(image)
        agree += max(probs, key=probs.get) == pre.classes[int(ckpt.model(x[None]).argmax())]
    rate = agree / len(inputs)
    if rate < INT8_AGREEMENT:
        raise ReslabError(f"{name}: Core ML's top-1 agrees with PyTorch on {100 * rate:.1f}% of the images")
    return {"predicted": True, "top1_agreement": rate, "verified_on": len(inputs)}


def _size(path: Path) -> int:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )
