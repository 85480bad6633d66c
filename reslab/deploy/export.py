"""Export a checkpoint to ONNX, TorchScript or a ``torch.export`` program, and verify the result.

Every export is run after writing (ONNX through ONNX Runtime) on real images and compared with
the PyTorch model; a mismatch fails. Class names and preprocessing travel with the file: ONNX
metadata, an extra file inside TorchScript/``.pt2`` archives, and a JSON sidecar for all.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.config import json_text
from reslab.deploy.fold import fold_batchnorm
from reslab.engine import Checkpoint
from reslab.errors import ReslabError
from reslab.weights import guard_output

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported": ".pt2"}  # file suffixes
OPSET = 18


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
# How far an export may stray from the PyTorch model, relative to the largest logit: float32
# rounding, or half precision's 11 significant bits through a deep network.
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}


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
        "input": f"{dtype} NCHW, preprocessed as 'preprocess' says",
    }


def write_onnx(
    model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool, metadata: dict[str, Any]
) -> None:
    import onnx  # only for export: a deployment dependency most commands never load

    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            opset_version=OPSET,
            external_data=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=shapes,
            verbose=False,
        )
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"reslab.{key}", json.dumps(value)
    onnx.save(proto, str(path))


def ort_session(path: str | os.PathLike, threads: int | None = None, gpu: bool = False):
    """An ONNX Runtime session with every graph optimisation (on its CUDA provider if ``gpu`` and
    this ONNX Runtime has one)."""
    import onnxruntime as ort  # only when an ONNX file is run: a deployment dependency

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), opts, providers=providers)


def run_exported(path: Path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Run an exported file the way a deployment would load it (half-precision ONNX on ONNX
    Runtime's CUDA provider where it has one)."""
    if fmt == "onnx":
        session = ort_session(path, gpu=x.dtype == torch.float16)
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]).float()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path))(x)
    with open(path, "rb") as f:  # a file object: torch.export warns about names not ending in .pt2
        return torch.export.load(f).module()(x)


KINDS = {"onnx": "ONNX model", "torchscript": "TorchScript module", "exported": "torch.export program"}


def export_model(
    ckpt: Checkpoint,
    fmt: str,
    out: str | os.PathLike,
    *,
    batch: str | int = "dynamic",
    fold_bn: bool = False,
    verify_inputs: torch.Tensor | None = None,
    precision: str = "fp32",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a checkpoint's model in ``fmt`` to ``out`` (+ ``out.json``) and verify it on
    ``verify_inputs`` against the fp32 PyTorch model. ``precision`` fp16 writes half-precision
    ONNX (weights and inputs), verified with ONNX Runtime (its CUDA provider where available).

    The file is written beside ``out`` under a temporary name, verified there, and only then
    renamed into place: a failed export or verification leaves whatever was at ``out`` as it was.
    ``out`` is never the checkpoint itself, nor a file of another kind (unless ``overwrite``).
    """
    if fmt not in FORMATS:
        raise ReslabError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS or (precision != "fp32" and fmt != "onnx"):
        raise ReslabError(f"--precision {precision}: fp32 for every format, fp16 for onnx")
    dtype = PRECISIONS[precision]
    dynamic = batch == "dynamic"
    if not dynamic and (not isinstance(batch, int) or batch < 1):
        raise ReslabError(f"--batch {batch!r}: 'dynamic' or a positive number")
    path = guard_output(out, KINDS[fmt], inputs=(ckpt.path,), overwrite=overwrite)
    sidecar = guard_output(f"{path}.json", "JSON", inputs=(ckpt.path,), overwrite=overwrite)
    model = ckpt.model.eval().cpu().float()
    deployed = (fold_batchnorm(model) if fold_bn else copy.deepcopy(model)).to(dtype)
    shape = (2 if dynamic else batch, ckpt.preprocess.channels, *ckpt.preprocess.size)
    example = torch.randn(shape, dtype=dtype)
    metadata = _metadata(ckpt, fmt, batch, fold_bn, precision)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(fmt, deployed, example, tmp, dynamic, metadata)
        except (OSError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "inline_container" not in str(e) and "file" not in str(e):
                raise  # an exporter failure, not a file problem
            reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
            raise ReslabError(f"{path}: cannot be written ({reason}); choose a writable --out") from None
        report = {
            "path": str(path),
            "format": fmt,
            "bytes": tmp.stat().st_size,
            "batch": batch,
            "folded_bn": fold_bn,
            "precision": precision,
        }
        if verify_inputs is not None:
            report.update(_verify(model, tmp, fmt, verify_inputs, dynamic, batch, precision, path))
        sidecar.write_text(json_text(metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return report


def _write(
    fmt: str, model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool, metadata: dict
) -> None:
    with torch.no_grad():
        if fmt == "onnx":
            write_onnx(model, example, path, dynamic, metadata)
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(model, example)
            traced.save(str(path), _extra_files={"reslab.json": json.dumps(metadata)})
        else:
            shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
            program = torch.export.export(model, (example,), dynamic_shapes=shapes)
            with open(path, "wb") as f:  # as in run_exported: any file name
                torch.export.save(program, f, extra_files={"reslab.json": json.dumps(metadata)})


def _verify(
    model: nn.Module,
    file: Path,
    fmt: str,
    inputs: torch.Tensor,
    dynamic: bool,
    batch: str | int,
    precision: str,
    name: Path,
) -> dict[str, Any]:
    """Run the written ``file`` on real ``inputs`` against the fp32 PyTorch model; raise on a mismatch."""
    dtype = PRECISIONS[precision]
    x = inputs.cpu() if dynamic else inputs[:batch].cpu()
    if not dynamic and len(x) < batch:
        x = x.repeat((batch + len(x) - 1) // len(x), *[1] * (x.ndim - 1))[:batch]
    with torch.no_grad():
        ref = model(x)
        got = run_exported(file, fmt, x.to(dtype))
    diff = (got - ref).abs().max().item()
    agree = (got.argmax(1) == ref.argmax(1)).float().mean().item()
    tol = TOLERANCE[precision] * max(1.0, ref.abs().max().item())
    report = {"verified_on": len(x), "max_abs_diff": diff, "top1_agreement": agree, "tolerance": tol}
    if fmt == "onnx":
        report["verified_with"] = ort_session(file, gpu=dtype == torch.float16).get_providers()[0]
    # in half precision two near-tied logits may swap: the tolerance is the test there
    if not diff <= tol or (precision == "fp32" and agree < 1.0):
        raise ReslabError(
            f"{name}: verification failed: max abs diff {diff:.3g} (tolerance {tol:.3g}), "
            f"top-1 agreement {100 * agree:.1f}% on {len(x)} images; nothing was written"
        )
    return report
