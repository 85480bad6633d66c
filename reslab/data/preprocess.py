"""How an image becomes a model input: one typed :class:`Preprocess`, recorded with every checkpoint.

Training derives it from the data (or from pretrained weights when fine-tuning); evaluation,
prediction, embedding and export read it back from the checkpoint, so a model always sees its
inputs the way it was trained on them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from torchvision.models import ResNet50_Weights  # its meta holds ImageNet's class names

from reslab.data.decode import Geometry
from reslab.errors import ReslabError
from reslab.models import get_model_entry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CIFAR-10's training-set statistics: the default of 32x32 models whose data is not at hand.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
DEFAULT_CROP_PCT = 0.875  # 224 of 256: torchvision's and timm's evaluation crop


@dataclass(frozen=True)
class Preprocess:
    """Geometry, normalisation and class names of a model's inputs.

    ``resize`` set: resize the shorter side to ``resize`` and center-crop ``size`` (ImageNet-style
    evaluation); unset: resize the whole image to ``size`` (small images, clips). ``mean``/``std``
    hold one value per channel (or one for all).
    """

    size: tuple[int, ...]  # (H, W), or (T, H, W) for clips
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    resize: int | None = None
    interpolation: str = "bilinear"
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("size", "mean", "std", "classes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, self.channels):
            raise ReslabError(
                f"preprocessing: mean {self.mean} and std {self.std} need one value per channel "
                f"({self.channels}) or one for all"
            )

    @property
    def crop(self) -> int:
        return self.size[-1]

    def geometry(self, train: bool = False) -> Geometry:
        """How an image file becomes this model's input: the evaluation resize and crop, or with
        ``train`` the random-resized crop of ImageNet-style training."""
        return Geometry(tuple(self.size[-2:]), self.resize, train, self.interpolation)

    def replace(self, **changes: Any) -> Preprocess:
        return replace(self, **changes)

    def for_channels(self, channels: int) -> Preprocess:
        """The same preprocessing for images of another channel count: per-channel statistics are
        averaged (RGB -> grey) or repeated (grey -> RGB)."""
        if channels == self.channels:
            return self
        if len(self.mean) == 1:
            return self.replace(channels=channels)
        mean, std = sum(self.mean) / len(self.mean), sum(self.std) / len(self.std)
        return self.replace(channels=channels, mean=(mean,) * channels, std=(std,) * channels)

    def unnormalised(self) -> Preprocess:
        """The same geometry with inputs left in [0, 1] (for models that normalise themselves)."""
        return self.replace(mean=(0.0,) * self.channels, std=(1.0,) * self.channels)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for checkpoints (read back with ``weights_only=True``) and JSON."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Read a stored preprocessing, also the untyped dicts of earlier reslab versions."""
        d = dict(d)
        kind = d.pop("kind", None)
        if kind is not None and kind != "imagenet":
            d.pop("resize", None)
        d.setdefault("channels", len(d["mean"]))
        known = {f: d[f] for f in cls.__dataclass_fields__ if f in d}
        return cls(**known)


def from_pretrained_cfg(cfg: dict[str, Any], classes: tuple[str, ...] = ()) -> Preprocess:
    """The preprocessing timm records with weights (``pretrained_cfg``): the input size, the
    centre crop fraction (resize the shorter side to ``floor(size / crop_pct)``, as timm's eval
    transform does), interpolation, mean and std."""
    channels, height, width = cfg.get("input_size", (3, 224, 224))
    crop_pct = cfg.get("crop_pct") or DEFAULT_CROP_PCT
    if cfg.get("crop_mode", "center") != "center":
        raise ReslabError(f"crop_mode {cfg['crop_mode']!r}: reslab evaluates with a centre crop only")
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    pre = Preprocess(
        (height, width),
        mean,
        std,
        len(mean),
        math.floor(height / crop_pct),
        cfg.get("interpolation", "bilinear"),
        classes,
    )
    return pre.for_channels(channels)


def to_pretrained_cfg(pre: Preprocess) -> dict[str, Any]:
    """:func:`from_pretrained_cfg`'s inverse: a ``Preprocess`` as timm's ``pretrained_cfg`` fields."""
    height, width = pre.size[-2:]
    crop_pct = height / pre.resize if pre.resize else 1.0
    if pre.resize and math.floor(height / crop_pct) != pre.resize:  # float rounding: aim mid-pixel
        crop_pct = height / (pre.resize + 0.5)
    return {
        "input_size": [pre.channels, height, width],
        "crop_pct": crop_pct,
        "crop_mode": "center",
        "interpolation": pre.interpolation,
        "mean": list(pre.mean),
        "std": list(pre.std),
    }


def default_preprocess(arch: str, in_chans: int, classes: tuple[str, ...] = ()) -> Preprocess:
    """ImageNet preprocessing for ImageNet-sized models, CIFAR-10's statistics for 32x32 ones."""
    size = tuple(get_model_entry(arch).spec.input_size[-2:])
    if size[0] >= 128:
        pre = Preprocess(size, IMAGENET_MEAN, IMAGENET_STD, 3, round(size[0] * 256 / 224), classes=classes)
    else:
        pre = Preprocess(size, CIFAR10_MEAN, CIFAR10_STD, 3, classes=classes)
    return pre.for_channels(in_chans)


def imagenet_classes(num_classes: int) -> list[str] | None:
    """ImageNet-1k's class names (torchvision's list) for 1000-class weights that carry none."""
    if num_classes != 1000:
        return None
    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
