"""Timing, measured one way everywhere: warm up, run for a minimum time, keep every call's time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def time_calls(
    fn: Callable[[], Any],
    min_time: float,
    warmup: int = 3,
    min_runs: int = 5,
    sync: Callable[[], Any] | None = None,
) -> list[float]:
    """Seconds of each call of ``fn`` after ``warmup`` calls, for at least ``min_time`` seconds and
    ``min_runs`` calls (``sync`` waits for a device's queued work after each call)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < min_runs:
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return times


def latency(times: list[float], batch: int) -> dict[str, float]:
    """p50/p90 latency (ms), their spread and the throughput at the median."""
    p50, p90 = np.percentile(times, [50, 90])
    return {
        "img_per_s": batch / p50,
        "p50_ms": 1e3 * p50,
        "p90_ms": 1e3 * p90,
        "spread_pct": 100 * (p90 - p50) / p50,
        "runs": len(times),
    }


def matmul_peak(
    seconds: float = 3.0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> float:
    """The best GFLOP/s (for int8: billions of integer operations per second) of large square
    matmuls in ``dtype`` on ``device``; int8 through ``torch._int_mm``, the kernel int8 inference
    uses.

    The fastest single call counts, not the mean: on a shared machine a mean is pulled down by
    whatever else runs, and a peak that is too low makes every fraction of it look too good.
    """
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    best = 0.0
    sizes = (
        (4096, 8192)
        if device.type != "cpu"
        else (1024, 2048, 3072)
        if dtype in (torch.float32, torch.int8)
        else (256, 512)
    )
    # (CPUs without bf16/fp16 units emulate them: large half-precision matmuls there take minutes)
    for n in sizes:
        if dtype == torch.int8:
            a, b = (torch.randint(-128, 128, (n, n), device=device, dtype=dtype) for _ in range(2))
            mm = torch._int_mm
        else:
            a, b = (
                torch.randn(n, n, device=device, dtype=dtype),
                torch.randn(n, n, device=device, dtype=dtype),
            )
            mm = torch.matmul
        mm(a, b)
        sync()
        end = time.perf_counter() + seconds / len(sizes)
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            mm(a, b)
            sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best
