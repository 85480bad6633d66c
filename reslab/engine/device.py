"""The one place that turns a device name into a device, and the per-device numerics: autocast and RNG."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from reslab.config import TrainConfig
from reslab.engine.timing import time_calls
from reslab.errors import ReslabError

LARGE_INPUT = 128  # inputs this wide and wider are ImageNet-sized: torch.compile pays off there


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ReslabError(f"--device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ReslabError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ReslabError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ReslabError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ReslabError(f"--device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def for_device(cfg: TrainConfig, device: torch.device, input_size: int) -> TrainConfig:
    """``cfg`` with its ``auto`` speed settings resolved for ``device`` and inputs ``input_size``
    pixels wide, and TF32 set as it says. Chosen by measurement on an H100 (README, "GPU training"):
    bf16 autocast where the GPU supports it; torch.compile for ImageNet-sized inputs (1.4x for
    ResNet-50), not for 32x32 ones, which CUDA graphs speed up instead (4x for ResNet-20); on CPUs
    fp32, uncompiled."""
    cuda = device.type == "cuda"
    amp = cfg.amp
    if amp == "auto":
        amp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "none"
    compile_ = cfg.compile
    if compile_ == "auto":
        compile_ = "on" if cuda and input_size >= LARGE_INPUT else "off"
    if cuda:
        set_tf32(cfg.tf32)
    return dataclasses.replace(cfg, amp=amp, compile=compile_)


DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def set_tf32(on: bool) -> None:
    """TF32 for CUDA matmuls and convolutions: the one switch (no effect on CPUs)."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def pytorch_tf32_defaults() -> None:
    """PyTorch's own defaults, as a reference model runs for its users: TF32 for convolutions
    (cuDNN), not for matmuls."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True


def at_precision(model: nn.Module, precision: str) -> nn.Module:
    """``model`` (in place) ready to run in ``precision`` for inference: bf16/fp16 weights, channels_last
    for images; ``tf32`` turns on TF32 matmuls and convolutions, ``fp32`` turns them off. Inputs
    are cast by :class:`Precise`, or by the caller."""
    set_tf32(precision == "tf32")
    model = model.to(DTYPES[precision])
    if precision in ("bf16", "fp16") and getattr(getattr(model, "spec", None), "ndim", 2) == 2:
        model = model.to(memory_format=torch.channels_last)
    return model


class Precise(nn.Module):
    """A model run in ``precision`` for inference: inputs cast on the way in (channels_last for
    half-precision images), outputs returned in fp32."""

    def __init__(self, model: nn.Module, precision: str) -> None:
        super().__init__()
        self.model, self.precision, self.dtype = at_precision(model, precision), precision, DTYPES[precision]
        self.memory_format = torch.channels_last if precision in ("bf16", "fp16") else torch.preserve_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.to(self.dtype, memory_format=self.memory_format)
        return self.model(x.to(self.dtype)).float()


@torch.no_grad()
def resolve_precision(
    precision: str,
    build: Callable[[str], nn.Module],
    probe: Callable[[], torch.Tensor] | None,
    device: torch.device,
    agreement: bool = True,
) -> dict[str, Any]:
    """The precision inference runs in, as a record: ``precision``, and how it was chosen.

    ``auto``: fp32 on CPUs; on CUDA bf16 or fp16, whichever runs the model ``build(precision)``
    returns faster on ``probe()``'s real inputs (ms per batch of both recorded). ``tf32`` off
    CUDA is fp32 (CPUs have no TF32) and says so. With ``agreement``, a precision other than fp32
    is checked against fp32: the share of ``probe()``'s inputs whose top-1 class agrees.
    """
    cuda = device.type == "cuda"
    chosen: dict[str, Any] = {"precision": precision}
    if precision == "tf32" and not cuda:
        return {"precision": "fp32", "asked": "tf32", "why": "no TF32 off CUDA"}
    if precision == "auto" and not cuda:
        return {"precision": "fp32", "chosen_from": "auto"}
    if precision == "fp32" or (precision != "auto" and not agreement) or probe is None:
        return chosen
    x = probe()
    if precision == "auto":
        timings = {}
        for candidate in ("bf16", "fp16"):
            model = build(candidate)
            times = time_calls(
                lambda m=model: m(x), 0.0, warmup=1, min_runs=10, sync=lambda: synchronize(device)
            )
            timings[candidate] = sorted(times)[len(times) // 2]
        best = min(timings, key=timings.get)
        chosen = {
            "precision": best,
            "chosen_from": "auto",
            "ms_per_batch": {k: 1e3 * v for k, v in timings.items()},
        }
    if agreement:
        reference = build("fp32")(x).argmax(1)
        agree = (build(chosen["precision"])(x).argmax(1) == reference).float().mean().item()
        chosen.update(top1_agreement_with_fp32=agree, agreement_images=len(x))
    return chosen


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision for ``amp`` ("none", "bf16" or "fp16"; "auto" is resolved by :func:`for_device`)."""
    if amp in ("none", "auto"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing needs it; CPUs run synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
