"""Typed, layered, validated configuration: dataclass defaults -> YAML recipe -> command-line overrides.

A recipe is a YAML file whose keys mirror :class:`TrainConfig`. Command-line overrides are
``dotted.key=value`` pairs (values parsed as YAML) or flags bound to a key. Each key's type and
allowed values are declared once, in the annotations below (``Literal`` choices, ``Annotated``
ranges): recipes, ``key=value`` overrides and flags all go through the same check, so ``--epochs 0``
and ``epochs: 0`` fail alike. ``None`` means "not set"; 0 is a value. Unknown keys fail with a
suggestion; the resolved config is written into every run directory, so a run can be repeated.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from reslab.errors import ReslabError

RECIPES_DIR = Path(__file__).parent / "recipes"


# --- constraints on values --------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """A numeric interval a value must lie in (open or closed at each end)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def problem(self, value: float) -> str | None:
        if isinstance(value, float) and math.isnan(value):
            return "is not a number"
        ok = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        return None if ok else f"must be {self}"

    def __str__(self) -> str:
        low = f"[{self.ge:g}" if self.ge is not None else (f"({self.gt:g}" if self.gt is not None else None)
        high = f"{self.le:g}]" if self.le is not None else (f"{self.lt:g})" if self.lt is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}"
        return f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}"


@dataclass(frozen=True)
class Pattern:
    """A string that must match a regular expression; ``example`` is shown when it does not."""

    regex: str
    example: str

    def problem(self, value: str) -> str | None:
        return None if re.fullmatch(self.regex, value) else f"must be {self.example}"


POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
PROBABILITY = Range(ge=0, le=1)
FRACTION = Range(ge=0, lt=1)  # a share that leaves something over (e.g. a validation split)
OPEN_FRACTION = Range(gt=0, lt=1)

PositiveInt = Annotated[int, POSITIVE]
PositiveFloat = Annotated[float, POSITIVE]
Count = Annotated[int, NON_NEGATIVE]
Device = Annotated[str, Pattern(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N or mps")]

# Choices: one Literal per kind, shared by config validation and the command line's flags.
DataName = Literal["default", "mnist", "cifar10", "cifar100", "folder", "clips", "synthetic_clips"]
Augment = Literal["auto", "none", "crop", "crop_flip", "imagenet"]
Switch = Literal["auto", "yes", "no"]
OptimName = Literal["sgd", "adamw"]
LrScaling = Literal["none", "linear"]
SchedName = Literal["constant", "multistep", "cosine", "onecycle"]
WarmupMode = Literal["linear", "constant"]
Amp = Literal["auto", "none", "bf16", "fp16"]
OnOff = Literal["auto", "on", "off"]
Precision = Literal["auto", "fp32", "tf32", "bf16", "fp16"]  # inference arithmetic
TTAMode = Literal["flip", "10crop"]  # test-time augmentation
ExportFormat = Literal["onnx", "torchscript", "exported", "pte", "coreml"]
Quantize = Literal["int8"]
ExportPrecision = Literal["fp32", "fp16"]
Freeze = Annotated[str, Pattern(r"base|none|stages:\d+", "base, none or stages:N")]
UnfreezeAt = Annotated[str, Pattern(r"\d+:\d+", "EPOCH:N (at EPOCH, unfreeze the last N stages)")]
FrozenBN = Literal["eval", "frozen"]
InChansMode = Literal["auto", "sum", "repeat"]


def choices(tp: Any) -> tuple[str, ...]:
    """The values a ``Literal`` type allows."""
    return typing.get_args(tp)


def arg_type(kind: type, constraint: Range | Pattern) -> Any:
    """An argparse ``type`` that reads ``kind`` and checks ``constraint``, for options that are not
    config keys (a study's grid size, a benchmark's batch sizes)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        problem = constraint.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    parse.__name__ = kind.__name__
    parse.constraint = constraint  # for tests that probe every option's bounds
    return parse


def add_device_option(p: argparse.ArgumentParser, help: str = "") -> None:
    """``--device``, as every command that runs a model takes it."""
    example = typing.get_args(Device)[1].example
    p.add_argument("--device", default="auto", help=f"{example} (default auto: CUDA when available){help}")


def data_name(name: str | None, folder: str | None) -> str | None:
    """The one rule for naming data on every command: a data folder without a data name means
    ``folder``; None when neither is given (the caller's default applies)."""
    return name if name is not None else ("folder" if folder is not None else None)


def one_budget(overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides where a budget given one way (epochs or iterations) replaces the recipe's other one."""
    if "epochs" in overrides or "iters" in overrides:
        overrides = {**overrides}
        overrides.setdefault("iters" if "epochs" in overrides else "epochs", None)
    return overrides


def int_list(constraint: Range) -> Any:
    """An argparse ``type`` for comma-separated integers, each checked (e.g. ``--depths 20,56``)."""
    item = arg_type(int, constraint)

    def parse(text: str) -> list[int]:
        values = [item(t) for t in text.split(",") if t.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
        return values

    parse.constraint = constraint
    return parse


# --- the configuration --------------------------------------------------------------------------


@dataclass
class DataConfig:
    # default: the embedded MNIST sample; folder: images in class folders; clips: a folder of video
    # clips; synthetic_clips: moving squares (a test of temporal models)
    name: DataName = "default"
    dir: str | None = None
    download: bool = False  # fetch CIFAR/MNIST with torchvision when missing (needs internet)
    val_split: Annotated[float, FRACTION] = 0.0  # hold out this fraction of train (paper's 45k/5k: 0.1)
    batch_size: PositiveInt = 128  # per device
    eval_batch_size: PositiveInt = 500
    workers: Count | None = None  # DataLoader workers for large-image folders (None: every CPU this
    # process may use, shared among the processes of one machine under torchrun)
    augment: Augment = "auto"
    pad: Count = 4  # random-crop padding of small images (paper Sec. 4.2: 4 pixels)
    image_size: PositiveInt | None = None  # crop size for large-image folders (224)
    resize: PositiveInt | None = None  # eval resize for large-image folders (image_size * 256 / 224)
    in_memory: Switch = "auto"  # decode small images once into a uint8 tensor
    decode: Literal["auto", "cpu", "gpu"] = "auto"  # large images: PIL in workers, or batches on the GPU
    cache_dir: str | None = None  # where decoded folders are cached (default: reslab's cache)
    limit_train: PositiveInt | None = None  # a random stratified subset of train (quick runs, tests)
    limit_test: PositiveInt | None = None
    classes: list[str] | None = None  # keep only these classes (e.g. transfer experiments)
    frames: PositiveInt = 16  # frames sampled per video clip
    mean: list[float] | None = None  # normalisation (default: computed from small-image training data,
    std: list[PositiveFloat] | None = None  # ImageNet's for large images); fine-tuning records its source's


@dataclass
class OptimConfig:
    name: OptimName = "sgd"
    lr: PositiveFloat = 0.1
    momentum: Annotated[float, FRACTION] = 0.9
    nesterov: bool = False
    weight_decay: Annotated[float, NON_NEGATIVE] = 1e-4
    decay_norm_and_bias: bool = True  # False: no weight decay on norm weights and biases
    betas: tuple[Annotated[float, FRACTION], Annotated[float, FRACTION]] = (0.9, 0.999)
    lr_scaling: LrScaling = "none"  # linear: lr * global_batch / 256 (Goyal et al. 2017)


@dataclass
class ScheduleConfig:
    name: SchedName = "multistep"
    # Milestones as fractions of the budget, so they follow --iters/--epochs: the paper's
    # 32k and 48k of 64k iterations are 0.5 and 0.75.
    milestones: list[Annotated[float, OPEN_FRACTION]] = field(default_factory=lambda: [0.5, 0.75])
    gamma: Annotated[float, Range(gt=0, le=1)] = 0.1
    warmup_iters: Count = 0
    warmup_mode: WarmupMode = "linear"  # linear: ramp from warmup_factor; constant: hold it
    warmup_factor: Annotated[float, PROBABILITY] = 0.1
    min_lr_factor: Annotated[float, PROBABILITY] = 0.0  # cosine / one-cycle floor, relative to lr
    peak_at: Annotated[float, OPEN_FRACTION] = 0.25  # one-cycle: fraction of the budget spent rising


@dataclass
class FinetuneConfig:
    """Transfer learning: start from pretrained weights, replace the head, freeze and unfreeze."""

    # a checkpoint/weights file, torchvision:NAME.WEIGHTS (e.g. torchvision:resnet50.IMAGENET1K_V2),
    # hf-hub:ORG/NAME[@REVISION] (e.g. hf-hub:timm/resnet50.a1_in1k) or local-dir:PATH
    source: str | None = None
    freeze: Freeze = "base"  # base: all but the head; stages:N: the stem and the first N stages; none
    unfreeze_at: list[UnfreezeAt] = field(default_factory=list)  # "EPOCH:N": unfreeze the last N stages
    head_lr: PositiveFloat | None = None  # default: optim.lr
    base_lr: PositiveFloat | None = None  # default: head_lr / 10 (pretrained layers move gently)
    frozen_bn: FrozenBN = "eval"  # eval: frozen parts keep BN statistics fixed | frozen: FrozenBatchNorm
    in_chans_mode: InChansMode = "auto"  # first-conv adaptation to other channel counts


@dataclass
class TrainConfig:
    model: str = "resnet20"
    model_args: dict[str, Any] = field(default_factory=dict)  # create_model overrides
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: ScheduleConfig = field(default_factory=ScheduleConfig)
    epochs: PositiveFloat | None = None  # budget in epochs ...
    iters: PositiveInt | None = None  # ... or in iterations (the paper: 64k); one of them
    label_smoothing: Annotated[float, FRACTION] = 0.0
    grad_clip: PositiveFloat | None = None  # max global gradient norm
    ema_decay: Annotated[float, OPEN_FRACTION] | None = None  # an exponential moving average of weights
    # GPU speed; "auto" is chosen per device by measurement (README, "GPU training"): CPUs run fp32,
    # eager and uncompiled; CUDA runs bf16 autocast (where supported) with TF32 matmuls, the small
    # CIFAR networks as one CUDA graph per step, ImageNet-sized ones compiled.
    amp: Amp = "auto"
    tf32: bool = True  # TF32 matmuls and convolutions on CUDA (no effect on CPUs)
    cuda_graphs: OnOff = "auto"  # capture the whole training step (static batch shapes only)
    channels_last: bool = False
    compile: OnOff = "auto"
    seed: Count = 0
    deterministic: bool = False  # deterministic kernels (bitwise-reproducible on CPU anyway)
    device: Device = "auto"
    out: str | None = None  # run directory (default runs/<model>-<data>-<time>)
    eval_every: PositiveInt = 1  # epochs between evaluations
    eval_every_iters: PositiveInt | None = None  # also evaluate every N iterations (short runs' curves)
    log_every: PositiveInt = 50  # iterations between metric rows
    sync_bn: bool = False  # SyncBatchNorm across processes (distributed runs)
    progress: bool = True
    # Recipe-level adjustments for particular models, e.g. the paper's warm-up for ResNet-110:
    # {resnet110: {sched.warmup_iters: 400}}. Applied after the recipe, before the command line.
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)


# --- reading values into the dataclasses -----------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def key_type(key: str, cls: type = TrainConfig) -> Any:
    """The annotated type of a dotted config key (``optim.lr`` -> ``Annotated[float, ...]``)."""
    head, _, rest = key.partition(".")
    hints = _hints(cls)
    if head not in hints:
        close = difflib.get_close_matches(head, list(hints), n=1)
        raise ReslabError(f"unknown config key {key!r}" + (f"; did you mean {close[0]}?" if close else ""))
    tp = hints[head]
    return key_type(rest, tp) if rest and dataclasses.is_dataclass(tp) else tp


def base_type(tp: Any) -> Any:
    """A type without ``None``, ``Annotated`` and containers' element types: what a flag parses."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return base_type(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return base_type(next(a for a in typing.get_args(tp) if a is not type(None)))
    return tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check and convert a YAML value to the annotated type (ints widen to floats, lists to tuples)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *constraints = typing.get_args(tp)
        coerced = _coerce(value, base, key)
        for c in constraints:
            problem = c.problem(coerced)
            if problem:
                raise ReslabError(f"{key}={value!r}: {problem}")
        return coerced
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ReslabError as e:
                errors.append(str(e))
        raise ReslabError(errors[0])
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool):  # YAML reads yes/no/on/off as booleans
            value = next((a for a in allowed if a in (("yes", "on") if value else ("no", "off"))), value)
        if value not in allowed:
            raise ReslabError(f"{key}={value!r}: choose one of {', '.join(allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ReslabError(f"config key {key!r} must be a mapping, got {value!r}")
        return build(tp, value, key + ".")
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ReslabError(f"config key {key!r} must be a list, got {value!r}")
        item_types = typing.get_args(tp) or (Any,)
        if origin is tuple and len(item_types) != len(value):
            raise ReslabError(f"config key {key!r} must have {len(item_types)} values, got {value!r}")
        items = [
            _coerce(v, item_types[i] if origin is tuple else item_types[0], key) for i, v in enumerate(value)
        ]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ReslabError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (float, int) and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        number = _number(value, tp)
        if number is not None:
            return number
    if tp is bool and isinstance(value, str) and value.lower() in ("yes", "no", "true", "false", "on", "off"):
        return value.lower() in ("yes", "true", "on")
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ReslabError(f"config key {key!r} must be {tp.__name__}, got {value!r}")
    return value


def _number(text: str, tp: type) -> float | int | None:
    """A number as Python reads it (``1e-3``, ``1E6``, ``1_000``), or None."""
    try:
        return tp(text.strip())
    except ValueError:
        return None


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """An instance of a config dataclass from plain data, every value checked against its annotation."""
    hints = _hints(cls)
    unknown = [k for k in values if k not in hints]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(hints), n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else ""
        raise ReslabError(f"unknown config key '{prefix}{k}'{hint}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain data (tuples as lists), ready for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ReslabError(f"config key {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_value(raw: str) -> Any:
    """A command-line value read as YAML (``0.1``, ``true``, ``[0.5, 0.75]``, ``null``)."""
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return raw


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML."""
    if "=" not in item:
        raise ReslabError(f"override {item!r} is not key=value (e.g. optim.lr=0.05)")
    key, raw = item.split("=", 1)
    return key.strip(), parse_value(raw)


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe file: a path, or the name of a bundled recipe (``cifar10_paper``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = RECIPES_DIR / f"{path.stem}.yaml"
    if bundled.is_file():
        return bundled
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ReslabError(f"recipe {name_or_path!r} not found; bundled recipes: {', '.join(names)}")


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from a file; a syntax error names the file and the line."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ReslabError(f"{path}:{where}: not valid YAML ({problem})") from None
    if not isinstance(loaded, dict):
        raise ReslabError(f"{path}: a recipe is a mapping of config keys")
    return loaded


def load_config(
    recipe: str | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults, then ``base`` (a nested dict, e.g. a run's saved config), the recipe, ``overrides``."""
    tree = merge({}, base or {})
    if recipe:
        tree = merge(tree, read_yaml(resolve_recipe(recipe)))
    overrides = dict(overrides or {})
    model = overrides.get("model", tree.get("model", TrainConfig.model))
    for key, value in (tree.get("per_model") or {}).get(model, {}).items():
        set_dotted(tree, key, value)
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    cfg = build(TrainConfig, tree)
    validate(cfg)
    return cfg


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(cfg: TrainConfig) -> None:
    """Checks that involve several keys (each key's own range is checked as it is read)."""
    if cfg.epochs is not None and cfg.iters is not None:
        raise ReslabError("give the budget as epochs or iters, not both (e.g. --iters 64000 or --epochs 30)")
    data = cfg.data
    if (data.mean is None) != (data.std is None) or (data.mean and len(data.mean) != len(data.std)):
        raise ReslabError(f"data.mean {data.mean} and data.std {data.std}: give both, one value per channel")
    if list(cfg.sched.milestones) != sorted(cfg.sched.milestones):
        raise ReslabError(f"sched.milestones must increase, got {cfg.sched.milestones}")


def save_config(cfg: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def cache_dir() -> Path:
    """Where reslab caches derived data: ``$RESLAB_CACHE``, else ``~/.cache/reslab``."""
    root = (
        os.environ.get("RESLAB_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reslab"
    )
    return Path(root)


def json_text(obj: Any, indent: int | None = 1) -> str:
    """JSON as reslab writes it everywhere: strict (a NaN or infinity, which JSON has no words for,
    becomes null) and plain (tuples as lists)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), indent=indent, allow_nan=False, default=float)
