"""Learning-rate schedules as pure functions of the iteration: nothing to save, nothing to drift.

A resumed run recomputes its learning rate from the iteration it resumes at, so its schedule is
the uninterrupted run's by construction.
"""

from __future__ import annotations

import bisect
import math

from reslab.config import ScheduleConfig


def lr_factor(it: int, total: int, cfg: ScheduleConfig) -> float:
    """The multiplier of the base learning rate at iteration ``it`` (0-based) of ``total``."""
    if it < cfg.warmup_iters:
        if cfg.warmup_mode == "constant":  # the paper's ResNet-110 warm-up: hold 0.01 = 0.1 x 0.1
            return cfg.warmup_factor
        return cfg.warmup_factor + (1 - cfg.warmup_factor) * it / cfg.warmup_iters
    floor = cfg.min_lr_factor
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "multistep":
        return cfg.gamma ** bisect.bisect_right([round(m * total) for m in cfg.milestones], it)
    span = max(1, total - cfg.warmup_iters)
    t = (it - cfg.warmup_iters) / span
    if cfg.name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    # one-cycle (Smith 2018), linear: rise from the floor to 1, then fall back to the floor.
    # With a warm-up, the warm-up is the rise.
    peak = 0.0 if cfg.warmup_iters else cfg.peak_at
    if t < peak:
        return floor + (1 - floor) * t / peak
    return floor + (1 - floor) * (1 - t) / (1 - peak)
