"""PyTorch's own distributed engine, detected from ``torchrun``'s environment.

One process per device; in a single process every helper here is a no-op, so the engine has a
single code path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch import nn

CPU = torch.device("cpu")
TIMEOUT = timedelta(seconds=int(os.environ.get("RESLAB_DIST_TIMEOUT", "300")))


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str = "auto") -> DistContext:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1): nccl on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    return DistContext(tdist.get_rank(), tdist.get_world_size(), local_rank, device)


def shutdown() -> None:
    """Leave the process group cleanly (a process that exits inside it can abort its peers)."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


@contextlib.contextmanager
def session(device_name: str = "auto") -> Iterator[DistContext]:
    """The process group of a run: joined on entry (when torchrun started several processes), left
    on exit, also after an error or an interruption."""
    joined = not tdist.is_initialized()
    try:
        yield setup(device_name)
    finally:
        if joined:
            shutdown()


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def is_main() -> bool:
    return not tdist.is_initialized() or tdist.get_rank() == 0


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    if ctx.world <= 1:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return (
        getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    )


def all_reduce_sum(*values: float | torch.Tensor) -> list[float]:
    """Sums of scalars over all processes, as floats (one collective for all of them)."""
    if not tdist.is_initialized():
        return [float(v) for v in values]
    device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
    if tdist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    tdist.all_reduce(t)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    if tdist.is_initialized():
        t = t.clone()
        tdist.all_reduce(t)
    return t


def any_flag(flag: bool) -> bool:
    """True on every process if it is True on any (e.g. one rank got Ctrl-C)."""
    return bool(all_reduce_sum(float(flag))[0]) if tdist.is_initialized() else flag
