"""Checkpoints: the one format (:class:`RunCheckpoint`), written atomically and read only here.

A reslab checkpoint is a dict of tensors and plain data (read with ``weights_only=True``): the
model's weights, what rebuilds the model (``arch``, ``model_args``, ``num_classes``, ``in_chans``),
its preprocessing and class names, and for training runs the config, the training policy, the
optimizer, scaler and EMA states, RNG states, progress, the code version and the settings the run
actually used. :class:`RunCheckpoint` is that dict typed; every reader and writer goes through it,
and it reads the checkpoints of earlier reslab versions too. :func:`read_checkpoint` turns a
checkpoint or a bare weights file (torchvision, timm, ...) into a model ready for inference.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.data import Preprocess, default_preprocess, from_pretrained_cfg, imagenet_classes
from reslab.engine.device import resolve_device
from reslab.errors import NonFiniteLoss, ReslabError
from reslab.hub import is_hub_name, locate
from reslab.models import create_model, get_model_entry
from reslab.weights import atomic_save, extract_state_dict, load_weights, read_file

LAST, BEST = "last.pt", "best.pt"
FORMAT = 2  # 1: reslab <= 0.1.0 of 2026-11 (no "format", "settings" or "code_version" keys)


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
class RunCheckpoint:
    """Everything a reslab checkpoint holds. Files written by :func:`reslab.save_weights` have the
    model part only (``state`` is None); training runs have all of it."""

    model: dict[str, torch.Tensor]
    arch: str
    model_args: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    in_chans: int | None = None
    classes: list[str] = field(default_factory=list)
    preprocess: dict[str, Any] | None = None
    config: dict[str, Any] | None = None  # the training config as given ("auto" resolved anew on resume)
    policy: dict[str, Any] | None = None  # how it trained beyond plain training (TrainPolicy.record)
    state: TrainState | None = None
    budget: Budget | None = None
    optimizer: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    ema: dict[str, torch.Tensor] | None = None
    rng: dict[str, Any] | None = None
    world: int = 1
    settings: dict[str, Any] = field(default_factory=dict)  # what the run used: device, precision, ...
    code_version: str = ""
    format: int = FORMAT

    @property
    def resumable(self) -> bool:
        return self.state is not None and self.budget is not None and self.optimizer is not None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["state"] = asdict(self.state) if self.state is not None else None
        out["budget"] = asdict(self.budget) if self.budget is not None else None
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "checkpoint") -> RunCheckpoint:
        """A checkpoint's dict, of this version or an earlier one."""
        if "arch" not in d or "model" not in d:
            raise ReslabError(f"{source}: not a reslab checkpoint (it does not name its architecture)")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        values["model"] = extract_state_dict(d, source=source)
        values["format"] = int(d.get("format", 1))
        if "state" in values:
            values["state"] = TrainState.from_dict(values["state"])
        if "budget" in values:
            values["budget"] = Budget(**values["budget"])
        if values.get("policy") and "kind" not in values["policy"]:  # format 1: {"finetune": {...}}
            (kind, config), *_ = values["policy"].items()
            values["policy"] = {
                "kind": kind,
                "module": f"reslab.{_OLD_POLICY_MODULES[kind]}",
                "config": config,
            }
        return cls(**values)


_OLD_POLICY_MODULES = {"finetune": "transfer"}


def read_run_checkpoint(path: str | os.PathLike) -> RunCheckpoint:
    """A reslab checkpoint file, typed."""
    return RunCheckpoint.from_dict(read_file(path), source=str(path))


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values() if t.dtype.is_floating_point)


def save_run_checkpoint(ckpt: RunCheckpoint, path: Path) -> None:
    """Write atomically; weights that are no longer finite never replace a good checkpoint."""
    if not all_finite(ckpt.model):
        iteration = ckpt.state.iteration if ckpt.state is not None else "?"
        raise NonFiniteLoss(
            f"the weights are no longer finite at iteration {iteration}; not saving over {path}"
        )
    atomic_save(ckpt.to_dict(), path)


def resume_file(run: str | os.PathLike) -> Path:
    """The checkpoint to resume from: ``RUN_DIR/last.pt``, or a checkpoint file named directly."""
    path = Path(run)
    if path.is_file():
        return path
    if not (path / LAST).exists():
        raise ReslabError(f"{path}: no {LAST} to resume from (resume takes a run directory or its {LAST})")
    return path / LAST


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
    preprocess_known: bool = False  # recorded with the weights (False: a default for the architecture)

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
    if is_hub_name(path):
        return _hub_checkpoint(str(path), model, device)
    obj = read_file(path)
    if "arch" in obj:
        rc = RunCheckpoint.from_dict(obj, source=str(path))
        if model and model != rc.arch:
            raise ReslabError(
                f"{path} is a {rc.arch} checkpoint, but --model says {model}; drop --model "
                "(it names the architecture of bare state dicts only)"
            )
    elif model is None:
        raise ReslabError(f"{path}: a bare state dict does not say which model it is; pass --model NAME")
    else:
        rc = RunCheckpoint(extract_state_dict(obj, source=str(path)), model)
    sd = rc.model
    num_classes = rc.num_classes or (sd["fc.weight"].shape[0] if "fc.weight" in sd else None)
    in_chans = rc.in_chans or _first_conv_in_chans(sd)
    net = create_model(rc.arch, num_classes=num_classes, in_chans=in_chans, **rc.model_args)
    load_weights(net, sd)
    pre = Preprocess.from_dict(rc.preprocess) if rc.preprocess else default_preprocess(rc.arch, in_chans)
    classes = rc.classes or pre.classes or [str(i) for i in range(net.num_classes)]
    return Checkpoint(
        net.to(resolve_device(device)).eval(),
        rc.arch,
        pre.replace(classes=tuple(classes)),
        str(path),
        rc.model_args,
        rc.config,
        rc.policy,
        preprocess_known=rc.preprocess is not None,
    )


def _hub_checkpoint(source: str, model: str | None, device: str | torch.device) -> Checkpoint:
    """Weights by name (``hf-hub:``, ``local-dir:``): the model its config names, with the
    preprocessing and class names that came with the weights."""
    found = locate(source)
    if model and get_model_entry(model).name != get_model_entry(found.arch).name:
        raise ReslabError(f"{source} holds a {found.arch}, not a {model}; drop --model")
    net = create_model(found.arch, pretrained=source)
    classes = (
        found.label_names or imagenet_classes(net.num_classes) or [str(i) for i in range(net.num_classes)]
    )
    pre = from_pretrained_cfg(found.pretrained_cfg, tuple(classes))
    return Checkpoint(
        net.to(resolve_device(device)).eval(),
        get_model_entry(found.arch).name,
        pre,
        source,
        found.model_args,
        preprocess_known=True,
    )
