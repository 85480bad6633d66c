"""ONNX: writing a model (with reslab's metadata), running it in ONNX Runtime, and int8 quantization.

onnx and onnxruntime are imported when an ONNX file is written or run: most commands never load them.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

OPSET = 18


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


def quantize_onnx(fp32: Path, int8: Path, calibration: torch.Tensor, batch: int = 16) -> Path:
    """Write an int8 QDQ model of ``fp32`` to ``int8``, calibrated on ``calibration`` inputs."""
    # onnxruntime's quantization tools: loaded only when quantizing (a deployment dependency)
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = ort_session(fp32).get_inputs()[0].name
    chunks = [calibration[i : i + batch].numpy() for i in range(0, len(calibration), batch)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(chunks)

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self.it, None)
            return None if chunk is None else {name: chunk}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(int8),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return int8
