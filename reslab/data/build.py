"""From a :class:`DataConfig` to loaders: :func:`build_data`, the one entry point.

Small images (the embedded sample, MNIST, CIFAR, folders of small images, clips) are decoded once
into uint8 tensors and batched from memory (:class:`TensorLoader`); folders of large images stream
from their files, decoded by DataLoader workers (:class:`FolderLoader`) or a batch at a time on
the GPU (:class:`BatchDecodeLoader`), as ``data.decode`` says. All share the :class:`Loader`
interface.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from reslab.config import DataConfig, build, cache_dir, data_name
from reslab.data.batched import BatchDecodeLoader, choose_decode
from reslab.data.folder import FolderLoader
from reslab.data.loader import Loader, Placement, default_workers
from reslab.data.memory import TensorLoader
from reslab.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
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
    train: Loader
    eval: Loader
    eval_split: str  # "val" when held out from train, else "test"
    preprocess: Preprocess  # how an image file becomes a model input (for eval/predict), with classes
    skipped: list[str] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=list)  # training images per class
    decode: str = "cpu"  # how images were decoded: cpu (PIL/libjpeg-turbo) or gpu (batched, nvjpeg)
    decode_choice: dict[str, Any] = field(default_factory=dict)  # why (auto's measured rates)

    @property
    def classes(self) -> list[str]:
        return list(self.preprocess.classes)

    @property
    def in_chans(self) -> int:
        return self.preprocess.channels

    @property
    def ndim(self) -> int:
        """Spatial dimensions of an input: 2 for images, 3 for clips."""
        return len(self.preprocess.size)


def _stratified(labels: torch.Tensor, fraction: float | None, count: int | None, seed: int) -> torch.Tensor:
    """A boolean mask picking ``fraction`` of each class (rounded, at least one), or exactly
    ``count`` images in all, at random.

    For a count each class gets its share rounded down, at least one image, and the images left
    over go to the classes with the largest remainders: ``limit_test=10`` is 10 images."""
    n = len(labels)
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    sizes = torch.stack([(labels == c).sum() for c in classes]).double()
    if fraction is not None:
        take = (sizes * fraction).round().clamp(min=1)
        left = 0
    else:
        total = min(n, count or n)
        exact = sizes * total / max(1, n)
        take = exact.floor().clamp(min=1).minimum(sizes)
        left = int(total - take.sum().item())
    if left > 0:
        order = (exact - exact.floor()).argsort(descending=True, stable=True)
        for i in order.tolist():
            if left == 0:
                break
            if take[i] < sizes[i]:
                take[i] += 1
                left -= 1
    mask = torch.zeros(n, dtype=torch.bool)
    for c, k in zip(classes, take.long().tolist(), strict=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        mask[idx[:k]] = True
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


def _data_root(cfg: DataConfig) -> Path:
    if cfg.dir:
        return Path(cfg.dir)
    env = os.environ.get("RESLAB_DATA")
    if env:
        return Path(env) / cfg.name
    raise ReslabError(f"--data {cfg.name} needs --data-dir DIR (or set RESLAB_DATA)")


def resolve_paths(cfg: DataConfig) -> DataConfig:
    """``cfg`` with its folders absolute, as runs record them: a run resumes and evaluates from any
    working directory."""
    absolute = {
        k: str(Path(v).expanduser().resolve()) for k in ("dir", "cache_dir") if (v := getattr(cfg, k))
    }
    return dataclasses.replace(cfg, **absolute)


def data_fingerprint(cfg: DataConfig) -> str:
    """What identifies the data a config reads: its kind and the path of every file relative to
    the data folder (class folders included), not where the folder is: the same data moved or
    copied elsewhere is the same data."""
    digest = hashlib.sha256(f"{cfg.name}|{cfg.frames}|{cfg.image_size}".encode())
    if cfg.name not in ("default", "synthetic_clips"):
        root = _data_root(cfg)
        if not root.is_dir():
            raise ReslabError(f"{root}: no such folder")
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            rel = Path(folder).relative_to(root)
            digest.update("".join(f"{rel / name}\n" for name in sorted(files)).encode())
    return digest.hexdigest()[:16]


def has_test_split(cfg: DataConfig) -> bool:
    """Whether the data has its own held-out split (folders need a val/ or test/ subfolder)."""
    if cfg.name not in ("folder", "clips") or not cfg.dir:
        return True
    return any((Path(cfg.dir) / n).is_dir() for n in ("val", "test"))


def checkpoint_data(
    config: dict[str, Any] | None,
    *,
    data: str | None = None,
    data_dir: str | None = None,
    source: str = "checkpoint",
    **changes: Any,
) -> tuple[DataConfig, int]:
    """The data a run was trained on (``config`` is its saved training config), or ``data``/
    ``data_dir`` instead, set up for evaluation, and the seed of its splits. Evaluation uses the
    test split, or the same held-out validation split as in training when the data has none.

    A ``data_dir`` without ``data`` means ``folder``, as on every command.
    """
    config = config or {}
    fields = dict(config.get("data") or {})
    fields = {k: v for k, v in fields.items() if k in DataConfig.__dataclass_fields__}
    data = data_name(data, data_dir)
    if data is not None and data != fields.get("name"):
        fields = {"name": data}
    if data_dir is not None:
        fields["dir"] = data_dir
    if not fields:
        raise ReslabError(f"{source}: no record of its data; pass --data (and --data-dir)")
    cfg = build(DataConfig, {**fields, "limit_train": None, "limit_test": None})
    if has_test_split(cfg):
        cfg.val_split = 0.0
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg, int(config.get("seed", 0))


def fixed_batches(
    config: dict[str, Any] | None,
    preprocess: Preprocess | None,
    *,
    split: str,
    limit: int,
    batch_size: int = 250,
    data: str | None = None,
    data_dir: str | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``limit`` real images of the data a run was trained on (see :func:`checkpoint_data`),
    un-augmented, as batches in memory: the same for every model a study compares.

    ``split``: "train" (a stratified subset of the training images) or "test".
    """
    key = "limit_train" if split == "train" else "limit_test"
    cfg, recorded_seed = checkpoint_data(
        config,
        data=data,
        data_dir=data_dir,
        augment="none",
        batch_size=batch_size,
        eval_batch_size=batch_size,
        **{key: limit},
    )
    place = Placement(device=torch.device(device), seed=recorded_seed if seed is None else seed)
    d = build_data(
        cfg,
        place=place,
        channels=preprocess.channels if preprocess else None,
        preprocess=preprocess,
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
    root = _data_root(cfg)
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
    # small images are decoded into memory at their own size; another data.image_size streams them
    small = max(h, w) <= SMALL_IMAGE_MAX and cfg.image_size in (None, h, w)
    if cfg.in_memory == "no" or (cfg.in_memory == "auto" and not small):
        return None
    cache = Path(cfg.cache_dir) if cfg.cache_dir else cache_dir() / "datasets"
    decoded = [decode_folder(s, channels, cache, progress) for s in (train, test) if s is not None]
    return decoded[0], decoded[1] if len(decoded) > 1 else None


def _normalisation(
    cfg: DataConfig, preprocess: Preprocess | None, channels: int, images: torch.Tensor | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std for ``channels``-channel inputs: a checkpoint's, the config's, computed from the
    training images, or ImageNet's; statistics of another channel count are averaged or repeated."""
    if preprocess is not None:
        pre = preprocess
    elif cfg.mean and cfg.std:
        pre = Preprocess((1, 1), cfg.mean, cfg.std, len(cfg.mean))
    elif images is not None:  # per-channel statistics of the training images: computed, not looked up
        pixels = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255
        return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist())
    else:
        pre = Preprocess((1, 1), IMAGENET_MEAN, IMAGENET_STD, 3)
    pre = pre.for_channels(channels)
    return pre.mean, pre.std


def build_data(
    cfg: DataConfig,
    *,
    place: Placement | None = None,
    channels: int | None = None,
    preprocess: Preprocess | None = None,
    progress: bool = True,
) -> Data:
    """Build the training and evaluation loaders described by ``cfg``.

    ``channels`` forces the number of input channels (grey images are repeated to RGB, colour
    images averaged to grey); by default the data decides. ``preprocess`` (a checkpoint's) fixes
    the normalisation and crop instead of deriving them from the training data.
    """
    place = place or Placement()
    arrays = load_arrays(cfg, progress)
    if arrays is None:
        return _streaming(cfg, place, channels, preprocess)
    size = tuple(arrays[0].images.shape[-2:])
    if cfg.image_size and cfg.name not in ("clips", "synthetic_clips") and cfg.image_size not in set(size):
        raise ReslabError(
            f"data.image_size={cfg.image_size}: {cfg.name}'s {size[0]}x{size[1]} images are decoded into memory "
            "at their own size; drop data.image_size"
            + (" or stream them from their files with data.in_memory=no" if cfg.name == "folder" else "")
        )
    skipped = arrays[0].skipped + (arrays[1].skipped if arrays[1] else [])
    train, evaluation, split = split_data(*arrays, cfg, place.seed)
    if channels and channels != train.images.shape[1]:
        train, evaluation = (a.with_channels(channels) for a in (train, evaluation))
    in_chans = train.images.shape[1]
    mean, std = _normalisation(cfg, preprocess, in_chans, train.images)
    augment = cfg.augment
    if augment == "auto":  # digits must not be mirrored, nor clips whose class is a direction
        augment = (
            "crop" if cfg.name in ("default", "mnist", "synthetic_clips") or in_chans == 1 else "crop_flip"
        )
    common = dict(mean=mean, std=std, place=place)
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
        preprocess=Preprocess(
            tuple(train.images.shape[2:]), mean, std, in_chans, classes=tuple(train.classes)
        ),
        skipped=skipped,
        class_counts=torch.bincount(train.labels, minlength=len(train.classes)).tolist(),
    )


def _streaming(
    cfg: DataConfig, place: Placement, channels: int | None, preprocess: Preprocess | None
) -> Data:
    found, test = find_splits(_data_root(cfg))
    train, evaluation, split = split_data(found, test, cfg, place.seed)
    in_chans = channels or peek_images(found)[1]
    if preprocess is not None and preprocess.resize is not None:
        size, resize, interpolation = preprocess.crop, preprocess.resize, preprocess.interpolation
    else:
        size = cfg.image_size or 224
        resize, interpolation = cfg.resize or round(size * 256 / 224), "bilinear"
    mean, std = _normalisation(cfg, preprocess, in_chans, None)
    pre = Preprocess((size, size), mean, std, in_chans, resize, interpolation, classes=tuple(train.classes))
    evaluate = pre.geometry()
    geometry = pre.geometry(train=cfg.augment != "none")
    workers = cfg.workers if cfg.workers is not None else default_workers()
    decode, how = choose_decode(cfg.decode, place.device, train.samples, geometry, in_chans, workers)
    # gpu: decoded a batch at a time on the device; cpu: one file at a time in DataLoader workers,
    # with JPEG DCT scaling for training crops
    loader = BatchDecodeLoader if decode == "gpu" else partial(FolderLoader, draft=True)
    common = dict(channels=in_chans, workers=workers, mean=mean, std=std, place=place)
    train_loader = loader(
        train.samples, geometry, batch_size=cfg.batch_size, train=True, eval_geometry=evaluate, **common
    )
    eval_loader = loader(evaluation.samples, evaluate, batch_size=cfg.eval_batch_size, train=False, **common)
    return Data(
        name=cfg.name,
        train=train_loader,
        eval=eval_loader,
        eval_split=split,
        preprocess=pre,
        class_counts=torch.bincount(train.labels, minlength=len(train.classes)).tolist(),
        decode=decode,
        decode_choice=how,
    )
