"""Inference benchmarks: every backend and precision measured in the same run, against torchvision.

Each (backend, precision, batch) cell is warmed up, then run repeatedly for a minimum time;
latencies give p50/p90 and the spread, throughput is images per second at the median latency,
and the work done (multiply-adds counted by running the model) gives GFLOP/s as a fraction of
this machine's measured matrix-multiply peak *in the precision the cell used* (fp32, TF32, bf16
or fp16: GPUs run them at very different speeds). Every cell's top-1 agrees with fp32 eager on the
same inputs, and the agreement is reported.
"""

from __future__ import annotations

import copy
import importlib.util
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
from reslab.deploy import edge
from reslab.deploy.fold import fold_batchnorm
from reslab.deploy.inputs import real_inputs
from reslab.deploy.onnx import ort_session, quantize_onnx, write_onnx
from reslab.engine import read_checkpoint, resolve_device
from reslab.engine.device import DTYPES, Precise, pytorch_tf32_defaults, set_tf32, synchronize
from reslab.engine.timing import latency, matmul_peak, time_calls
from reslab.errors import ReslabError
from reslab.hub import is_hub_name
from reslab.models import create_model, get_model_entry

BACKENDS = (
    "torchvision",
    "reslab",
    "reslab-cl-fold",
    "reslab-compile",
    "reslab-graph",
    "ort-fp32",
    "ort-int8",
    "executorch-fp32",
    "executorch-int8",
)
CPU_ONLY = ("ort-fp32", "ort-int8", "executorch-fp32", "executorch-int8")  # runtimes measured on CPUs
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
GRAPH_MAX_BATCH = 8  # CUDA graphs matter where launches dominate: small batches


def _torchvision_builder(name: str) -> Callable[[], nn.Module] | None:
    """torchvision's builder of the architecture called ``name``, if it has one."""
    for namespace in (torchvision.models, torchvision.models.video):
        if name in torchvision.models.list_models(module=namespace):
            return getattr(namespace, name)
    return None


def default_backends(device: torch.device) -> tuple[str, ...]:
    """Every backend that runs on ``device``: ONNX Runtime and ExecuTorch on CPUs (ExecuTorch where
    its extra is installed), CUDA graphs on CUDA."""
    extra = {"cpu": CPU_ONLY, "cuda": ("reslab-graph",)}.get(device.type, ())
    return ("torchvision", "reslab", "reslab-cl-fold", "reslab-compile", *extra)


def default_precisions(device: torch.device) -> tuple[str, ...]:
    return ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32",)


def _unavailable(name: str, in_chans: int, device: torch.device, backends: tuple[str, ...]) -> dict[str, str]:
    """Backends asked for that cannot run here, and why."""
    reasons = {
        "torchvision": f"torchvision has no {name}"
        if _torchvision_builder(name) is None
        else (f"torchvision's {name} reads 3 channels, this one {in_chans}" if in_chans != 3 else None),
        **{b: f"{b.split('-')[0]} is measured on the CPU only" for b in CPU_ONLY if device.type != "cpu"},
        **{
            b: f"ExecuTorch is not installed ({edge.EXTRA})"
            for b in CPU_ONLY
            if b.startswith("executorch") and device.type == "cpu" and not _executorch_installed()
        },
        "reslab-graph": "CUDA graphs need a CUDA device" if device.type != "cuda" else None,
    }
    return {b: reasons[b] for b in backends if reasons.get(b)}


def bench(
    target: str,
    *,
    batches: tuple[int, ...] = (1, 8),
    input_size: int | None = None,
    device: str = "auto",
    backends: tuple[str, ...] | None = None,
    precisions: tuple[str, ...] | None = None,
    min_time: float = 2.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark a registered model name or a checkpoint; returns the peaks and a list of rows.

    A backend that cannot run here (torchvision lacks the model; ONNX Runtime off the CPU; CUDA
    graphs off CUDA) is left out with a warning, and refused when nothing else was asked for.
    Torchvision is the fp32 reference, run with PyTorch's own TF32 defaults as its users run it (each
    row says which TF32 setting it ran with); ONNX Runtime rows are fp32 and int8 whatever ``precisions``.
    """
    dev = resolve_device(device)
    backends = backends or default_backends(dev)
    precisions = precisions or default_precisions(dev)
    unknown = [b for b in backends if b not in BACKENDS] + [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ReslabError(
            f"unknown backend(s)/precision(s) {unknown}; backends {', '.join(BACKENDS)}; precisions {', '.join(PRECISIONS)}"
        )
    model_args: dict[str, Any] = {}
    real = None  # a checkpoint's own test images, where it records its data
    if is_hub_name(target) or Path(target).is_file():
        ckpt = read_checkpoint(target, device="cpu")
        model, name, model_args = ckpt.model, ckpt.arch, ckpt.model_args
        if (ckpt.config or {}).get("data") and not input_size:
            real = real_inputs(ckpt, None, max(batches))
    else:
        name = target
        model = create_model(name).eval()
    spec = get_model_entry(name).spec
    size = tuple(spec.input_size) if real is None else tuple(real.shape[2:])
    if input_size:
        size = (*size[:-2], input_size, input_size)
    unavailable = _unavailable(name, model.in_chans, dev, backends)
    if unavailable and set(backends) <= set(unavailable):
        raise ReslabError(
            f"--backends {','.join(backends)}: {'; '.join(unavailable.values())}; choose others"
        )
    for backend, reason in unavailable.items():
        warnings.warn(f"{reason}: the {backend} rows are left out", stacklevel=2)
    backends = tuple(b for b in backends if b not in unavailable)
    sync = (lambda: synchronize(dev)) if dev.type == "cuda" else None
    say = progress or (lambda _msg: None)
    peaks = {}
    int8 = {"int8"} if any(b.endswith("-int8") for b in backends) else set()
    for p in sorted({*precisions, "fp32", *int8}):
        say(f"measuring the {p} matmul peak")
        set_tf32(p == "tf32")
        peaks[p] = matmul_peak(1.5 * min_time, device=dev, dtype=DTYPES.get(p, torch.int8))
    with torch.device("meta"):
        twin = create_model(name, num_classes=model.num_classes, in_chans=model.in_chans, **model_args)
        macs_per_image = count_macs(twin.eval(), (1, model.in_chans, *size))
    model = model.to(dev).eval()
    layout = torch.channels_last if spec.ndim == 2 else torch.channels_last_3d
    fast = fold_batchnorm(model).to(memory_format=layout)
    runners = _runners(name, model, fast, backends, precisions, dev, size, say)
    rows: list[dict[str, Any]] = []
    raised: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for bs in batches:
            x = _inputs(real, bs, (model.in_chans, *size)).to(dev)
            with torch.no_grad():
                set_tf32(False)
                reference = model(x).argmax(1)  # the fp32 answer every row is checked against
            for (backend, precision), make in runners.items():
                if backend == "reslab-graph" and bs > GRAPH_MAX_BATCH:
                    continue
                say(f"{backend} {precision} batch {bs}")
                tf32 = _set_tf32_for(backend, precision, dev)
                with torch.no_grad():
                    fn = make(x, Path(tmp))
                    out = torch.as_tensor(fn()).to(dev)
                    cell = latency(time_calls(fn, min_time, sync=sync), bs)
                gflops = 2 * macs_per_image * cell["img_per_s"] / 1e9
                rows.append(
                    {
                        "backend": backend,
                        "precision": precision,
                        "batch": bs,
                        **cell,
                        "gflops_per_s": gflops,
                        "peak_precision": precision if precision in peaks else "fp32",
                        "top1_agree": (out.float().argmax(1) == reference).float().mean().item(),
                        "tf32": tf32,
                    }
                )
    set_tf32(False)
    for row in rows:
        ref = next((r for r in rows if r["backend"] == "torchvision" and r["batch"] == row["batch"]), None)
        row["vs_torchvision"] = row["img_per_s"] / ref["img_per_s"] if ref else None
    # A row faster than the matmul measurement means the measurement ran low (a busy machine, or
    # convolution kernels that beat a plain matmul): the peak is then the fastest row, and said so.
    for precision, peak in list(peaks.items()):
        best = max((r["gflops_per_s"] for r in rows if r["peak_precision"] == precision), default=0.0)
        if best > peak:
            peaks[precision] = best
            raised.append(precision)
    for row in rows:
        row["peak_fraction"] = row["gflops_per_s"] / peaks[row.pop("peak_precision")]
    return {
        "model": name,
        "input_size": list(size),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "peak_gflops": peaks,
        "peak_raised_to_fastest_row": raised,
        "gflops_per_image": 2 * macs_per_image / 1e9,
        "rows": rows,
    }


def _inputs(real: torch.Tensor | None, batch: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A batch of real images (repeated when there are fewer), else of random inputs: speed does
    not depend on the pixels, top-1 agreement does (random inputs give near-tied logits)."""
    if real is None:
        return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    return real.repeat(-(-batch // len(real)), *[1] * (real.ndim - 1))[:batch]


def _set_tf32_for(backend: str, precision: str, device: torch.device) -> str:
    """TF32 as each row runs: torchvision (the reference) with PyTorch's own defaults, as its users
    run it; reslab's rows on only when their precision is tf32. Returns what was set."""
    if device.type != "cuda":
        return "n/a"
    if backend == "torchvision":
        pytorch_tf32_defaults()
        return "PyTorch default (cuDNN on, matmul off)"
    set_tf32(precision == "tf32")
    return "on" if precision == "tf32" else "off"


def _runners(name, model, fast, backends, precisions, dev, size, say) -> dict[tuple[str, str], Callable]:
    """For each (backend, precision): a function of (inputs, a temporary folder) returning the
    call to time. Models are built (and compiled) once and reused for every batch size."""
    runners: dict[tuple[str, str], Callable] = {}
    if "torchvision" in backends:
        tv = _torchvision_builder(name)(num_classes=model.num_classes)
        tv.load_state_dict(model.state_dict())  # the same weights: outputs are compared
        tv = tv.to(dev).eval()
        runners["torchvision", "fp32"] = lambda x, _t: lambda: tv(x)
    for precision in precisions:
        if "reslab" in backends:
            eager = Precise(copy.deepcopy(model), precision) if precision != "fp32" else model
            runners["reslab", precision] = lambda x, _t, m=eager: lambda: m(x)
        if "reslab-cl-fold" in backends:
            folded = Precise(copy.deepcopy(fast), precision)
            runners["reslab-cl-fold", precision] = lambda x, _t, m=folded: lambda: m(x)
        if "reslab-compile" in backends:
            compiled = _Lazy(lambda p=precision: _compile(Precise(copy.deepcopy(fast), p)), say, "compiling")
            runners["reslab-compile", precision] = lambda x, _t, m=compiled: lambda: m(x)
        if "reslab-graph" in backends:
            graphed = _Lazy(
                lambda p=precision: _compile(Precise(copy.deepcopy(fast), p), "reduce-overhead"),
                say,
                "compiling with CUDA graphs",
            )
            runners["reslab-graph", precision] = lambda x, _t, m=graphed: lambda: m(x).clone()
    for backend in ("ort-fp32", "ort-int8"):
        if backend in backends:
            runners[backend, backend[4:]] = lambda x, tmp, b=backend: _ort_runner(
                _onnx(fast, x, tmp, b == "ort-int8", name, say), x
            )
    for backend in ("executorch-fp32", "executorch-int8"):
        if backend in backends:
            runners[backend, backend[11:]] = lambda x, tmp, b=backend: _pte_runner(
                fast, x, tmp, b == "executorch-int8", say
            )
    return runners


class _Lazy:
    """A model built on first use (compiling takes a while: only for the cells that run)."""

    def __init__(self, build: Callable[[], Any], say: Callable[[str], None], message: str) -> None:
        self.build, self.say, self.message, self.model = build, say, message, None

    def __call__(self, *args: Any) -> Any:
        if self.model is None:
            if self.message:
                self.say(self.message)
            self.model = self.build()
        return self.model(*args)


def _onnx(fast: nn.Module, x: torch.Tensor, tmp: Path, int8: bool, name: str, say) -> Path:
    """The model exported to ONNX (fp32), and quantized to int8 if asked, once per run."""
    fp32 = tmp / "model.onnx"
    if not fp32.exists():
        say("exporting ONNX")
        example = torch.randn(2, *x.shape[1:], device=x.device)  # a dynamic batch needs >= 2
        write_onnx(fast, example, fp32, True, {"arch": name})
    if not int8:
        return fp32
    quantized = tmp / "model.int8.onnx"
    if not quantized.exists():
        say("quantizing to int8 (random calibration inputs: speed only)")
        quantize_onnx(fp32, quantized, torch.randn(32, *x.shape[1:]))
    return quantized


def _executorch_installed() -> bool:
    return importlib.util.find_spec("executorch") is not None


def _pte_runner(fast: nn.Module, x: torch.Tensor, tmp: Path, int8: bool, say) -> Callable[[], Any]:
    """The model as an ExecuTorch program for ``x``'s batch (fixed, as on a device), run by
    ExecuTorch's runtime (int8: PT2E-quantized on random inputs, which is enough to time it)."""
    path = tmp / f"model-{len(x)}{'-int8' if int8 else ''}.pte"
    model = copy.deepcopy(fast).cpu().to(memory_format=torch.contiguous_format)  # NCHW: channels_last fails
    edge.decompose_batchnorm(model)
    if int8:
        say("quantizing to int8 for ExecuTorch (random calibration inputs: speed only)")
        model = edge.quantize_pt2e(model, torch.randn(32, *x.shape[1:]))
    say(f"writing an ExecuTorch program for batch {len(x)}")
    edge.write_pte(model, x.cpu(), path)
    run = edge.pte_runner(path)
    return lambda: run(x.cpu())


def _ort_runner(path: Path, x: torch.Tensor) -> Callable[[], Any]:
    session = ort_session(path, threads=torch.get_num_threads())
    feed = {session.get_inputs()[0].name: x.cpu().numpy()}
    return lambda: torch.from_numpy(session.run(None, feed)[0])


def _compile(model: nn.Module, mode: str | None = None) -> Callable:
    """torch.compile for inference: inductor with frozen (constant-folded, pre-packed) weights;
    ``reduce-overhead`` also replays the compiled model as a CUDA graph."""
    inductor_config.freezing = True
    return torch.compile(model, mode=mode)
