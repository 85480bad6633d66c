"""Inference benchmarks: every backend measured in the same run, against torchvision eager.

Each (backend, batch) cell is warmed up, then run repeatedly for a minimum time; latencies give
p50/p90 and the spread, throughput is images per second at the median latency, and the work
done (multiply-adds counted by running the model) gives GFLOP/s as a fraction of this machine's
measured fp32 matrix-multiply peak.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as inductor_config
import torchvision
from torch import nn

from reslab.complexity import count_macs
from reslab.deploy.export import ort_session, write_onnx
from reslab.deploy.fold import fold_batchnorm
from reslab.deploy.quantize import quantize_onnx
from reslab.deploy.timing import latency, matmul_peak, time_calls
from reslab.engine import read_checkpoint, resolve_device
from reslab.errors import ReslabError
from reslab.models import create_model, get_model_entry

BACKENDS = ("torchvision", "reslab", "reslab-cl-fold", "reslab-compile", "ort-fp32", "ort-int8")


def _torchvision_builder(name: str) -> Callable[[], nn.Module] | None:
    """torchvision's builder of the architecture called ``name``, if it has one."""
    for namespace in (torchvision.models, torchvision.models.video):
        if name in torchvision.models.list_models(module=namespace):
            return getattr(namespace, name)
    return None


def bench(
    target: str,
    *,
    batches: tuple[int, ...] = (1, 8),
    input_size: int | None = None,
    device: str = "cpu",
    backends: tuple[str, ...] = BACKENDS,
    min_time: float = 2.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark a registered model name or a checkpoint; returns the peak and a list of rows.

    A backend that cannot run here (torchvision lacks the model; ONNX Runtime off the CPU) is left
    out with a warning, and refused when nothing else was asked for.
    """
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ReslabError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    dev = resolve_device(device)
    if Path(target).is_file():
        ckpt = read_checkpoint(target, device="cpu")
        model, name = ckpt.model, ckpt.arch
    else:
        name = target
        model = create_model(name).eval()
    spec = get_model_entry(name).spec
    size = tuple(spec.input_size)
    if input_size:
        size = (*size[:-2], input_size, input_size)
    unavailable = {
        b: reason
        for b, reason in (
            ("torchvision", f"torchvision has no {name}"),
            ("ort-fp32", "ONNX Runtime is measured on the CPU only"),
            ("ort-int8", "ONNX Runtime is measured on the CPU only"),
        )
        if b in backends and (_torchvision_builder(name) is None if b == "torchvision" else dev.type != "cpu")
    }
    if unavailable and set(backends) <= set(unavailable):
        raise ReslabError(
            f"--backends {','.join(backends)}: {'; '.join(unavailable.values())}; choose others"
        )
    for backend, reason in unavailable.items():
        warnings.warn(f"{reason}: the {backend} rows are left out", stacklevel=2)
    backends = tuple(b for b in backends if b not in unavailable)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    say = progress or (lambda _msg: None)
    say("measuring the fp32 matmul peak")
    peak = matmul_peak(1.5 * min_time, device=dev)
    with torch.device("meta"):
        macs_per_image = count_macs(
            create_model(name, num_classes=model.num_classes).eval(), (1, model.in_chans, *size)
        )
    model = model.to(dev).eval()
    rows: list[dict[str, Any]] = []
    tv = _torchvision_builder(name)() if "torchvision" in backends else None
    if tv is not None:
        tv.load_state_dict(model.state_dict())  # the same weights: outputs are compared below
        tv = tv.to(dev).eval()
    fast = fold_batchnorm(model).to(
        memory_format=torch.channels_last if spec.ndim == 2 else torch.channels_last_3d
    )
    compiled = None
    tmp = tempfile.TemporaryDirectory()
    onnx_fp32 = onnx_int8 = None
    for bs in batches:
        x = torch.randn(bs, model.in_chans, *size, device=dev)
        x_cl = x.contiguous(memory_format=torch.channels_last if spec.ndim == 2 else torch.channels_last_3d)
        with torch.no_grad():
            reference = model(x)
        runners: dict[str, Callable[[], Any]] = {}
        if tv is not None:
            runners["torchvision"] = lambda tv=tv, x=x: tv(x)
        if "reslab" in backends:
            runners["reslab"] = lambda x=x: model(x)
        if "reslab-cl-fold" in backends:
            runners["reslab-cl-fold"] = lambda x=x_cl: fast(x)
        if "reslab-compile" in backends:
            if compiled is None:
                say("compiling (torch.compile, inductor with frozen weights)")
                compiled = _compile(fast)
            runners["reslab-compile"] = lambda x=x_cl, fn=compiled: fn(x)
        if dev.type == "cpu" and ("ort-fp32" in backends or "ort-int8" in backends):
            if onnx_fp32 is None:
                say("exporting ONNX")
                onnx_fp32 = Path(tmp.name) / "model.onnx"
                example = torch.randn(2, model.in_chans, *size, device=dev)  # a dynamic batch needs >= 2
                write_onnx(fast, example, onnx_fp32, True, {"arch": name})
            if "ort-fp32" in backends:
                runners["ort-fp32"] = _ort_runner(onnx_fp32, x)
            if "ort-int8" in backends:
                if onnx_int8 is None:
                    say("quantizing to int8 (random calibration inputs: speed only)")
                    onnx_int8 = quantize_onnx(
                        onnx_fp32, Path(tmp.name) / "model.int8.onnx", torch.randn(32, model.in_chans, *size)
                    )
                runners["ort-int8"] = _ort_runner(onnx_int8, x)
        for backend, fn in runners.items():
            say(f"{backend} batch {bs}")
            with torch.no_grad():
                out = torch.as_tensor(fn()).to(reference.device)
                cell = latency(time_calls(fn, min_time, sync=sync), bs)
            gflops = 2 * macs_per_image * cell["img_per_s"] / 1e9
            agree = (out.argmax(1) == reference.argmax(1)).float().mean().item()
            rows.append(
                {
                    "backend": backend,
                    "batch": bs,
                    **cell,
                    "gflops_per_s": gflops,
                    "peak_fraction": gflops / peak,
                    "top1_agree": agree,
                }
            )
    tmp.cleanup()
    for row in rows:
        ref = next((r for r in rows if r["backend"] == "torchvision" and r["batch"] == row["batch"]), None)
        row["vs_torchvision"] = row["img_per_s"] / ref["img_per_s"] if ref else None
    return {
        "model": name,
        "input_size": list(size),
        "device": device,
        "threads": torch.get_num_threads(),
        "peak_gflops": peak,
        "gflops_per_image": 2 * macs_per_image / 1e9,
        "rows": rows,
    }


def _ort_runner(path: Path, x: torch.Tensor) -> Callable[[], Any]:
    session = ort_session(path, threads=torch.get_num_threads())
    feed = {session.get_inputs()[0].name: x.cpu().numpy()}
    return lambda: torch.from_numpy(session.run(None, feed)[0])


def _compile(model: nn.Module) -> Callable:
    """torch.compile for inference: inductor with frozen (constant-folded, pre-packed) weights."""
    inductor_config.freezing = True
    return torch.compile(model)
