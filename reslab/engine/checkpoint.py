"""Checkpoints: the format a run writes (atomically), its resume state, and the one reader.

A reslab checkpoint is a plain dict of tensors and plain data (read with ``weights_only=True``):
the model's weights, what is needed to rebuild it (``arch``, ``model_args``, ``num_classes``,
``in_chans``), its preprocessing and class names, the training config, and for resuming the
optimizer, scaler, EMA, RNG states and the run's progress. :func:`read_checkpoint` turns a
checkpoint or a bare weights file (torchvision, timm, ...) into a model and typed metadata.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.data import Preprocess, default_preprocess
from reslab.engine.device import resolve_device
from reslab.errors import NonFiniteLoss, ReslabError
from reslab.models import create_model
from reslab.weights import atomic_save, extract_state_dict, load_weights, read_file

LAST, BEST = "last.pt", "best.pt"


@dataclass(frozen=True)
class Budget:
    """How long a run trains, in iterations of the global batch it started with.

    Progress is counted in samples, so a run resumed with another number of processes keeps its
    data order and its learning-rate schedule.
    """

    total_iters: int
    global_batch: int

    def position(self, state: TrainState) -> int:
        """Where the schedule is, in iterations of the original global batch."""
        return state.samples // self.global_batch

    def done(self, state: TrainState) -> bool:
        return state.samples >= self.total_iters * self.global_batch


def empty_sums() -> dict[str, float]:
    return {"loss": 0.0, "err": 0.0, "n": 0.0, "time": 0.0}


@dataclass
class TrainState:
    """Where a run is: the part of a checkpoint that is not tensors of the model or optimizer."""

    epoch: int = 0  # epochs completed
    step: int = 0  # batches this process did in the current epoch
    iteration: int = 0  # optimizer steps done in all
    samples: int = 0  # training samples seen, over all processes and epochs
    epoch_samples: int = 0  # ... and in the current epoch
    best_err: float = math.inf
    best_iteration: int = -1
    # Running sums of the current epoch: loss, errors, samples, seconds (restored on resume), and
    # the training seconds of finished epochs.
    sums: dict[str, float] = field(default_factory=empty_sums)
    train_seconds: float = 0.0

    def end_epoch(self) -> None:
        self.train_seconds += self.sums["time"]
        self.epoch += 1
        self.step = self.epoch_samples = 0
        self.sums = empty_sums()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        d = dict(d)
        sums = dict(d.pop("sums", {}))
        total = sums.pop("total_time", None)  # earlier versions kept it among the sums
        if total is not None:
            d.setdefault("train_seconds", total)
        return cls(**d, sums={**empty_sums(), **sums})


@dataclass
class Checkpoint:
    """A model ready for inference and what belongs to it."""

    model: nn.Module
    arch: str
    preprocess: Preprocess  # with the class names
    path: str
    model_args: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None  # the training config (None for bare weights)
    policy: dict[str, Any] | None = None  # what trained it beyond plain training (e.g. fine-tuning)

    @property
    def classes(self) -> list[str]:
        return list(self.preprocess.classes)


def _first_conv_in_chans(sd: dict[str, torch.Tensor]) -> int:
    return next((v.shape[1] for k, v in sd.items() if k.endswith("weight") and v.ndim >= 4), 3)


def read_checkpoint(
    path: str | os.PathLike, model: str | None = None, device: str | torch.device = "auto"
) -> Checkpoint:
    """Read a reslab checkpoint (it names its architecture) or a bare state dict (torchvision,
    timm, ...; ``model`` names it) into a model in eval mode on ``device`` (default: CUDA when
    available), with its metadata."""
    obj = read_file(path)
    recorded = obj.get("arch")
    if model and recorded and model != recorded:
        raise ReslabError(
            f"{path} is a {recorded} checkpoint, but --model says {model}; drop --model "
            "(it names the architecture of bare state dicts only)"
        )
    arch = recorded or model
    if arch is None:
        raise ReslabError(f"{path}: a bare state dict does not say which model it is; pass --model NAME")
    sd = extract_state_dict(obj, source=str(path))
    num_classes = obj.get("num_classes") or (sd["fc.weight"].shape[0] if "fc.weight" in sd else None)
    in_chans = obj.get("in_chans") or _first_conv_in_chans(sd)
    model_args = dict(obj.get("model_args") or {})
    net = create_model(arch, num_classes=num_classes, in_chans=in_chans, **model_args)
    load_weights(net, sd)
    stored = obj.get("preprocess")
    pre = Preprocess.from_dict(stored) if stored else default_preprocess(arch, in_chans)
    classes = obj.get("classes") or pre.classes or [str(i) for i in range(net.num_classes)]
    return Checkpoint(
        net.to(resolve_device(device)).eval(),
        arch,
        pre.replace(classes=tuple(classes)),
        str(path),
        model_args,
        obj.get("config"),
        obj.get("policy"),
    )


def resume_file(run: str | os.PathLike) -> Path:
    """The checkpoint to resume from: ``RUN_DIR/last.pt``, or a checkpoint file named directly."""
    path = Path(run)
    if path.is_file():
        return path
    if not (path / LAST).exists():
        raise ReslabError(f"{path}: no {LAST} to resume from (resume takes a run directory or its {LAST})")
    return path / LAST


def all_finite(model: nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in model.state_dict().values() if t.dtype.is_floating_point)


def save_checkpoint(content: dict[str, Any], model: nn.Module, path: Path, iteration: int) -> None:
    """Write atomically; weights that are no longer finite never replace a good checkpoint."""
    if not all_finite(model):
        raise NonFiniteLoss(
            f"the weights are no longer finite at iteration {iteration}; not saving over {path}"
        )
    atomic_save(content, path)
