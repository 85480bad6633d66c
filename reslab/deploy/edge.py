"""Programs for phones and small boards: ExecuTorch (``.pte`` with the XNNPACK delegate) and Core ML
(``.mlpackage``), and PT2E int8 quantization for ExecuTorch.

The libraries (``executorch``, which brings ``torchao`` and ``coremltools``) are an optional extra,
``pip install 'reslab[edge]'``, imported only here and only when a device export runs.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.data import Preprocess
from reslab.errors import ReslabError

EXTRA = "pip install 'reslab[edge]'"


def require(module: str) -> Any:
    """Import one of the edge libraries, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ReslabError(f"{module.split('.')[0]} is not installed; {EXTRA}") from None


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Silence what the native runtimes print straight to the process's stdout/stderr while loading
    (ExecuTorch's CPU-info probes, coremltools' progress bars); shown again if loading fails."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            sink.seek(0)
            captured = sink.read()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            sys.stderr.buffer.write(captured[-4000:])
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class ChannelAffine(nn.Module):
    """An eval-mode BatchNorm as what it computes, ``x * scale + shift`` per channel: two ops every
    delegate runs. Pre-activation networks keep BatchNorms that no conv precedes (folding cannot
    remove them), and XNNPACK does not take a standalone ``batch_norm``."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        scale = (
            bn.weight / torch.sqrt(bn.running_var + bn.eps)
            if bn.affine
            else 1 / torch.sqrt(bn.running_var + bn.eps)
        )
        shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
        shape = (1, -1) + (1,) * (2 if isinstance(bn, nn.BatchNorm2d) else 3)
        self.register_buffer("scale", scale.detach().reshape(shape))
        self.register_buffer("shift", shift.detach().reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def decompose_batchnorm(model: nn.Module) -> int:
    """Replace (in place) every BatchNorm left after folding by a :class:`ChannelAffine`."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, ChannelAffine(getattr(owner, child)))
    return len(names)


# --- ExecuTorch ------------------------------------------------------------------------------------


def quantize_pt2e(model: nn.Module, calibration: torch.Tensor, batch: int = 16) -> nn.Module:
    """Static int8 quantization with PyTorch 2 export (PT2E) and the XNNPACK quantizer: int8
    per-channel weights, int8 activations whose ranges are observed on ``calibration`` (real images,
    the model in eval mode). Returns the quantized module (quantize/dequantize ops around int8
    kernels) for :func:`write_pte`."""
    quantizer_mod = require("executorch.backends.xnnpack.quantizer.xnnpack_quantizer")
    pt2e = require("torchao.quantization.pt2e.quantize_pt2e")
    quantizer = quantizer_mod.XNNPACKQuantizer().set_global(
        quantizer_mod.get_symmetric_quantization_config(is_per_channel=True)
    )
    example = calibration[:batch].contiguous()
    shapes = ({0: torch.export.Dim("batch", min=1, max=max(2, len(calibration)))},)
    graph = torch.export.export(model.eval(), (example,), dynamic_shapes=shapes).module()
    prepared = pt2e.prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for i in range(0, len(calibration), batch):
            prepared(calibration[i : i + batch].contiguous())
    return pt2e.convert_pt2e(prepared)


def write_pte(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """An ExecuTorch program for ``example``'s (fixed) shape, every op XNNPACK takes delegated to it."""
    exir = require("executorch.exir")
    partitioner = require("executorch.backends.xnnpack.partition.xnnpack_partitioner")
    program = torch.export.export(model, (example.contiguous(),))  # NCHW: channels_last fails there
    lowered = exir.to_edge_transform_and_lower(program, partitioner=[partitioner.XnnpackPartitioner()])
    path.write_bytes(lowered.to_executorch().buffer)


def pte_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the program at ``path`` with ExecuTorch's runtime, as an app would."""
    runtime = require("executorch.runtime")
    with quiet_native_output():
        method = runtime.Runtime.get().load_program(str(path)).load_method("forward")
        meta = method.metadata
        batch = meta.input_tensor_meta(0).sizes()[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        """Any number of inputs, in chunks of the program's fixed batch (the last one padded)."""
        outs = []
        for i in range(0, len(x), batch):
            chunk = x[i : i + batch].contiguous()
            n = len(chunk)
            if n < batch:
                chunk = torch.cat([chunk, chunk[-1:].expand(batch - n, *chunk.shape[1:])])
            outs.append(method.execute([chunk])[0][:n].clone())
        return torch.cat(outs)

    return run


# --- Core ML ---------------------------------------------------------------------------------------


class Probabilities(nn.Module):
    """A classifier's softmax: Core ML's classifier output expects probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(1)


def image_normalisation(pre: Preprocess) -> tuple[float, list[float], torch.Tensor]:
    """Core ML's image input computes ``scale * pixel + bias[c]`` with one scale for every channel.
    The model's per-channel ``(pixel / 255 - mean[c]) / std[c]`` is that with scale ``1 / (255 s)``
    and bias ``-mean[c] / s`` for the mean ``s`` of the stds, times ``s / std[c]``: a per-channel
    factor that the first convolution absorbs exactly (zero padding stays zero). Returns the scale,
    the biases and the factors."""
    std = torch.tensor(pre.std, dtype=torch.float64).expand(pre.channels)
    mean = torch.tensor(pre.mean, dtype=torch.float64).expand(pre.channels)
    s = std.mean().item()
    return 1 / (255 * s), (-mean / s).tolist(), (s / std).float()


def first_conv(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Conv3d))


def write_coreml(model: nn.Module, pre: Preprocess, path: Path, precision: str, batch: int = 1) -> None:
    """An ML Program (``.mlpackage``) taking an image (the normalisation in its input, as
    :func:`image_normalisation` says), giving the class label and the class probabilities."""
    ct = require("coremltools")
    scale, bias, factors = image_normalisation(pre)
    conv = first_conv(model)
    with torch.no_grad():
        conv.weight.mul_(factors.view(1, -1, *[1] * (conv.weight.ndim - 2)))
    shape = (batch, pre.channels, *pre.size)
    program = torch.export.export(Probabilities(model).eval(), (torch.zeros(shape),)).run_decompositions({})
    layout = ct.colorlayout.GRAYSCALE if pre.channels == 1 else ct.colorlayout.RGB
    with quiet_native_output():
        converted = ct.convert(
            program,
            inputs=[ct.ImageType(name="image", shape=shape, scale=scale, bias=bias, color_layout=layout)],
            classifier_config=ct.ClassifierConfig(list(pre.classes)),
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
            minimum_deployment_target=ct.target.iOS16,
        )
    converted.short_description = f"{len(pre.classes)}-class image classifier exported by reslab"
    converted.save(str(path))


def inspect_coreml(path: Path) -> dict[str, Any]:
    """What a saved ML Program says of itself: input, outputs, precision and operations."""
    ct = require("coremltools")
    with quiet_native_output():
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    image = spec.description.input[0]
    ops = [
        op.type
        for function in spec.mlProgram.functions.values()
        for block in function.block_specializations.values()
        for op in block.operations
    ]
    dtypes = {
        op.outputs[0].type.tensorType.dataType
        for function in spec.mlProgram.functions.values()
        for block in function.block_specializations.values()
        for op in block.operations
        if op.type == "conv"
    }
    fp16 = ct.proto.MIL_pb2.DataType.Value("FLOAT16")
    return {
        "input": image.name,
        "input_type": image.type.WhichOneof("Type"),
        "input_size": [image.type.imageType.height, image.type.imageType.width],
        "color": ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(image.type.imageType.colorSpace),
        "outputs": [o.name for o in spec.description.output],
        "predicted": spec.description.predictedFeatureName,
        "conv_precision": "fp16" if dtypes == {fp16} else "fp32",
        "ops": len(ops),
        "op_types": sorted(set(ops)),
    }


def coreml_can_predict() -> bool:
    """Whether Core ML models run here: macOS with coremltools' native library."""
    if platform.system() != "Darwin":
        return False
    try:
        importlib.import_module("coremltools.libcoremlpython")
    except ImportError:
        return False
    return True


def coreml_runner(path: Path) -> Callable[[Any], dict[str, float]]:
    """A function of a PIL image returning the class probabilities (macOS only)."""
    ct = require("coremltools")
    model = ct.models.MLModel(str(path))
    outputs = [o.name for o in model.get_spec().description.output]
    probs = next(o for o in outputs if o.endswith("_probs") or o != "classLabel")
    return lambda image: model.predict({"image": image})[probs]
