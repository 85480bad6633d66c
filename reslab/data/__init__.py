"""Datasets for training and evaluation: one call, :func:`build_data`, from a :class:`DataConfig`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reslab.config import DataConfig
from reslab.data.folder import IMAGENET_MEAN, IMAGENET_STD, FolderLoader, imagenet_transforms
from reslab.data.memory import TensorLoader
from reslab.data.sources import (
    ImageArrays,
    decode_folder,
    find_splits,
    load_cifar,
    load_embedded,
    load_mnist,
    peek_images,
)
from reslab.data.video import load_clip_folder, synthetic_clips
from reslab.errors import ReslabError

SMALL_IMAGE_MAX = 64  # folders of images up to this size are decoded into memory


@dataclass
class Data:
    """Loaders and what a model needs to know about the data (classes, channels, preprocessing)."""

    name: str
    train: TensorLoader | FolderLoader
    eval: TensorLoader | FolderLoader
    eval_split: str  # "val" when held out from train, else "test"
    classes: list[str]
    in_chans: int
    preprocess: dict[str, Any]  # how to turn an image file into a model input (for eval/predict)
    skipped: list[str] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=list)  # training images per class


def _stratified(labels: torch.Tensor, fraction: float | None, count: int | None, seed: int) -> torch.Tensor:
    """A boolean mask picking ``fraction`` (or ``count`` in all) of each class, at random."""
    n = len(labels)
    share = fraction if fraction is not None else min(1.0, (count or n) / max(1, n))
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        mask[idx[: max(1, round(len(idx) * share))]] = True
    return mask


def split_data(train, test, cfg: DataConfig, seed: int) -> tuple[Any, Any, str]:
    """Apply the class selection, the subsets and the validation split to decoded arrays or file
    lists alike: (training part, evaluation part, "val" or "test")."""
    if cfg.classes:
        train, test = train.select_classes(cfg.classes), test.select_classes(cfg.classes) if test else None
    if cfg.limit_train:
        train = train.subset(_stratified(train.labels, None, cfg.limit_train, seed))
    if cfg.val_split > 0:
        held = _stratified(train.labels, cfg.val_split, None, seed + 1)
        return train.subset(~held), train.subset(held), "val"
    if test is None:
        raise ReslabError(
            f"{cfg.dir}: no val/ or test/ folder; pass --val-split 0.1 to hold out part of train"
        )
    if cfg.limit_test:
        test = test.subset(_stratified(test.labels, None, cfg.limit_test, seed))
    return train, test, "test"


def _default_dir(name: str) -> Path:
    env = os.environ.get("RESLAB_DATA")
    if env:
        return Path(env) / name
    raise ReslabError(f"--data {name} needs --data-dir DIR (or set RESLAB_DATA)")


def has_test_split(cfg: DataConfig) -> bool:
    """Whether the data has its own held-out split (folders need a val/ or test/ subfolder)."""
    if cfg.name not in ("folder", "clips") or not cfg.dir:
        return True
    return any((Path(cfg.dir) / n).is_dir() for n in ("val", "test"))


def checkpoint_data(
    meta: dict[str, Any], *, data: str | None = None, data_dir: str | None = None, **changes: Any
) -> tuple[DataConfig, int]:
    """The data a checkpoint was trained on (or ``data``/``data_dir``), set up for evaluation, and the
    seed of its splits. Evaluation uses the test split, or the same held-out validation split as in
    training when the data has none."""
    config = meta.get("config") or {}
    fields = dict(config.get("data") or meta.get("data") or {})
    fields = {k: v for k, v in fields.items() if k in DataConfig.__dataclass_fields__}
    if data is not None and data != fields.get("name"):
        fields = {"name": data}
    if data_dir is not None:
        fields["dir"] = data_dir
    if not fields:
        raise ReslabError(
            f"{meta.get('path', 'checkpoint')}: no record of its data; pass --data (and --data-dir)"
        )
    cfg = DataConfig(**{**fields, "limit_train": None, "limit_test": None})
    if has_test_split(cfg):
        cfg.val_split = 0.0
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg, int(config.get("seed", 0))


def fixed_batches(
    meta: dict[str, Any],
    *,
    split: str,
    limit: int,
    batch_size: int = 250,
    data: str | None = None,
    data_dir: str | None = None,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``limit`` real images of the data a checkpoint was trained on (see :func:`checkpoint_data`),
    un-augmented, as batches in memory: the same for every model a study compares.

    ``meta`` is a checkpoint's metadata (its preprocessing is used) or ``{"data": {...}}``.
    ``split``: "train" (a stratified subset of the training images) or "test".
    """
    key = "limit_train" if split == "train" else "limit_test"
    cfg, recorded_seed = checkpoint_data(
        meta,
        data=data,
        data_dir=data_dir,
        augment="none",
        batch_size=batch_size,
        eval_batch_size=batch_size,
        **{key: limit},
    )
    pre = meta.get("preprocess")
    d = build_data(
        cfg,
        seed=seed or recorded_seed,
        channels=pre["channels"] if pre else None,
        preprocess=pre,
        progress=False,
    )
    loader = d.train.as_eval(batch_size) if split == "train" else d.eval
    return [(x, y) for x, y in loader]


def load_arrays(cfg: DataConfig, progress: bool = True) -> tuple[ImageArrays, ImageArrays | None] | None:
    """Train and test arrays for small-image datasets, or None when the data must stream from files."""
    if cfg.name == "default":
        return load_embedded()
    if cfg.name == "synthetic_clips":  # 512 train and 256 test clips; limit_train/limit_test subset them
        size = cfg.image_size or 32
        return synthetic_clips(512, cfg.frames, size, seed=1), synthetic_clips(256, cfg.frames, size, seed=2)
    root = Path(cfg.dir) if cfg.dir else _default_dir(cfg.name)
    if cfg.name == "mnist":
        return load_mnist(root, cfg.download)
    if cfg.name in ("cifar10", "cifar100"):
        return load_cifar(root, 10 if cfg.name == "cifar10" else 100, cfg.download)
    if cfg.name == "clips":
        size = cfg.image_size or 112
        held = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
        train_dir = root / "train" if (root / "train").is_dir() else root
        test = load_clip_folder(held, cfg.frames, size) if held else None
        return load_clip_folder(train_dir, cfg.frames, size), test
    train, test = find_splits(root)
    (h, w), channels = peek_images(train)
    small = max(h, w) <= SMALL_IMAGE_MAX
    if cfg.in_memory == "no" or (cfg.in_memory == "auto" and not small):
        return None
    from reslab.complexity import cache_dir

    cache = Path(cfg.cache_dir) if cfg.cache_dir else cache_dir() / "datasets"
    decoded = [decode_folder(s, channels, cache, progress) for s in (train, test) if s is not None]
    return decoded[0], decoded[1] if len(decoded) > 1 else None


def build_data(
    cfg: DataConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    channels: int | None = None,
    channels_last: bool = False,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    preprocess: dict[str, Any] | None = None,
) -> Data:
    """Build the training and evaluation loaders described by ``cfg``.

    ``channels`` forces the number of input channels (grey images are repeated to RGB, colour
    images averaged to grey); by default the data decides. ``preprocess`` (a checkpoint's) fixes
    the normalisation and crop instead of deriving them from the training data.
    """
    arrays = load_arrays(cfg, progress)
    if arrays is None:
        return _build_streaming(cfg, seed, device, channels, channels_last, rank, world, preprocess)
    skipped = arrays[0].skipped + (arrays[1].skipped if arrays[1] else [])
    train, evaluation, split = split_data(*arrays, cfg, seed)
    if channels and channels != train.images.shape[1]:
        train, evaluation = (_convert_channels(a, channels) for a in (train, evaluation))
    in_chans = train.images.shape[1]
    if preprocess is not None:
        mean, std = tuple(preprocess["mean"]), tuple(preprocess["std"])
    elif cfg.mean and cfg.std:
        mean, std = tuple(cfg.mean), tuple(cfg.std)
    else:  # per-channel statistics of the training images: computed, not looked up
        pixels = train.images.transpose(0, 1).reshape(in_chans, -1).double() / 255
        mean, std = tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist())
    augment = cfg.augment
    if augment == "auto":  # digits must not be mirrored, nor clips whose class is a direction
        augment = (
            "crop" if cfg.name in ("default", "mnist", "synthetic_clips") or in_chans == 1 else "crop_flip"
        )
    common = dict(
        mean=mean, std=std, seed=seed, device=device, channels_last=channels_last, rank=rank, world=world
    )
    return Data(
        name=cfg.name,
        train=TensorLoader(
            train.images,
            train.labels,
            batch_size=cfg.batch_size,
            train=True,
            augment=augment,
            pad=cfg.pad,
            **common,
        ),
        eval=TensorLoader(
            evaluation.images, evaluation.labels, batch_size=cfg.eval_batch_size, train=False, **common
        ),
        eval_split=split,
        classes=train.classes,
        in_chans=in_chans,
        preprocess={
            "kind": "resize" if train.images.ndim == 4 else "clip",
            "size": list(train.images.shape[2:]),
            "mean": list(mean),
            "std": list(std),
            "channels": in_chans,
        },
        skipped=skipped,
        class_counts=torch.bincount(train.labels, minlength=len(train.classes)).tolist(),
    )


def _convert_channels(a: ImageArrays, channels: int) -> ImageArrays:
    x = a.images
    x = (
        x.expand(-1, channels, *x.shape[2:]).contiguous()
        if x.shape[1] == 1
        else x.float().mean(1, keepdim=True).round().to(torch.uint8)
    )
    return ImageArrays(x, a.labels, a.classes, a.skipped)


def _build_streaming(cfg: DataConfig, seed, device, channels, channels_last, rank, world, preprocess) -> Data:
    root = Path(cfg.dir)
    found, test = find_splits(root)
    train, evaluation, split = split_data(found, test, cfg, seed)
    samples, classes = train.samples, train.classes
    in_chans = channels or peek_images(found)[1]
    if preprocess is not None and preprocess.get("kind") == "imagenet":
        size, resize = preprocess["size"][-1], preprocess["resize"]
        mean, std = tuple(preprocess["mean"]), tuple(preprocess["std"])
    else:
        size = cfg.image_size or 224
        resize = cfg.resize or round(size * 256 / 224)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,), (0.5,))
        if cfg.mean and cfg.std:
            mean, std = tuple(cfg.mean), tuple(cfg.std)
    workers = cfg.workers if cfg.workers is not None else min(8, os.cpu_count() or 1)
    common = dict(
        channels=in_chans,
        workers=workers,
        seed=seed,
        device=device,
        channels_last=channels_last,
        rank=rank,
        world=world,
        mean=mean,
        std=std,
    )
    return Data(
        name=cfg.name,
        train=FolderLoader(
            samples,
            imagenet_transforms(cfg.augment != "none", size, resize),
            batch_size=cfg.batch_size,
            train=True,
            eval_transform=imagenet_transforms(False, size, resize),
            **common,
        ),
        eval=FolderLoader(
            evaluation.samples,
            imagenet_transforms(False, size, resize),
            batch_size=cfg.eval_batch_size,
            train=False,
            **common,
        ),
        eval_split=split,
        classes=classes,
        in_chans=in_chans,
        preprocess={
            "kind": "imagenet",
            "size": [size, size],
            "resize": resize,
            "mean": list(mean),
            "std": list(std),
            "channels": in_chans,
        },
        class_counts=torch.bincount(train.labels, minlength=len(classes)).tolist(),
    )
