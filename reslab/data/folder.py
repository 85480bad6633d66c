"""Folders of large images, decoded and transformed one file at a time by DataLoader workers: the CPU path.

Each worker reads a file, decodes it (libjpeg-turbo through torchvision; PIL for the formats
torchvision does not read) and applies the :class:`~reslab.data.decode.Geometry` to uint8; a batch
leaves the worker as one uint8 tensor and is normalised on the device. Each sample's augmentation
is seeded by (seed, epoch, index) rather than by a worker's RNG stream, so the batches do not
depend on the number of workers and a resumed run sees the same crops as an uninterrupted one.
Undecodable files are skipped and reported by name.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Self

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from reslab.data.decode import Geometry, describe_failure, load_image
from reslab.data.loader import Placement, Uint8Normalizer, in_background, shard_order, step_seed
from reslab.errors import ReslabError


def read_bytes(path: str) -> bytes | str:
    """A file's bytes, or a skip message naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"{path}: {type(e).__name__}: {e.strerror}"
    return data if data else f"{path}: empty file"


class ImageFiles(Dataset):
    """(path, label) pairs -> (uint8 image of the geometry's size, label); an unreadable file
    becomes a skip message naming it. ``draft``: JPEG DCT scaling for large training crops."""

    def __init__(
        self, samples: list[tuple[str, int]], geometry: Geometry, channels: int = 3, draft: bool = False
    ) -> None:
        self.samples, self.geometry, self.channels, self.draft = samples, geometry, channels, draft

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int] | str:
        index, seed = item
        path, label = self.samples[index]
        data = read_bytes(path)
        if isinstance(data, str):
            return data
        try:
            return load_image(data, self.geometry, seed, self.channels, self.draft), label
        except Exception as e:  # decoders raise many kinds for truncated or non-image files
            return describe_failure(path, e)


class SeededSampler(Sampler):
    """Yields (index, sample seed): a per-epoch permutation (or the natural order), sharded by rank."""

    def __init__(self, n: int, *, shuffle: bool, place: Placement) -> None:
        self.n, self.shuffle, self.place = n, shuffle, place
        self.epoch, self.start_sample = 0, 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """As :meth:`TensorLoader.set_epoch`: skip the first ``start_sample`` samples (all processes)."""
        self.epoch, self.start_sample = epoch, start_sample

    def indices(self, start: int = 0) -> list[int]:
        p = self.place
        order = shard_order(
            self.n,
            shuffle=self.shuffle,
            seed=p.seed,
            epoch=self.epoch,
            start=start,
            rank=p.rank,
            world=p.world,
        )
        return order.tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.indices(self.start_sample):
            yield i, step_seed(self.place.seed, self.epoch, i)

    def __len__(self) -> int:
        return len(self.indices(self.start_sample))


def collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A worker's batch as one uint8 tensor, its labels, and the skip messages of its bad files."""
    good = [b for b in batch if not isinstance(b, str)]
    skipped = [b for b in batch if isinstance(b, str)]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), skipped
    return torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good], dtype=torch.int64), skipped


class FileLoader:
    """What both file loaders share: their constructor, a :class:`SeededSampler` over the samples
    feeding DataLoader workers, their lengths, the evaluation twin, naming unreadable files on
    stderr and in ``skipped`` (or refusing them with ``strict``), and the hand-over of finished
    batches.

    Subclasses say what the workers produce (:meth:`files`, ``collate``) and how batches are
    finished (:meth:`batches`). ``geometry`` transforms training images (``eval_geometry``, or
    ``geometry``, those of the evaluation twin built by :meth:`as_eval`). ``background``: prepare
    batches in a background thread (:func:`in_background`) even off CUDA, where the loader does
    real work in this process.
    """

    background = False
    decode = "cpu"  # the decoding path, as ``data.decode`` names it
    collate = None  # the DataLoader's collate_fn for what :meth:`files` yields

    def __init__(
        self,
        samples: list[tuple[str, int]],
        geometry: Geometry,
        *,
        batch_size: int,
        train: bool,
        channels: int,
        workers: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        place: Placement | None = None,
        strict: bool = False,
        eval_geometry: Geometry | None = None,
    ) -> None:
        place = place or Placement()
        self._eval_args = dict(
            samples=samples, geometry=eval_geometry or geometry, batch_size=batch_size,
            channels=channels, workers=workers, mean=mean, std=std, place=place, strict=strict,
        )  # fmt: skip
        self.device, self.place, self.train = place.device, place, train
        self.geometry, self.channels = geometry, channels
        self.batch_size, self.strict = batch_size, strict
        self.normalize = Uint8Normalizer(mean, std, 4, self.device)
        dataset = self.files(samples)
        self.sampler = SeededSampler(len(dataset), shuffle=train, place=place)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=type(self).collate,
            drop_last=train,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
        )
        self.skipped: list[str] = []

    def files(self, samples: list[tuple[str, int]]) -> Dataset:
        """What the DataLoader workers read for each sample."""
        raise NotImplementedError

    def as_eval(self, batch_size: int | None = None) -> Self:
        """The same files in their natural order, every one, with the evaluation geometry."""
        return type(self)(**{**self._eval_args, "batch_size": batch_size or self.batch_size}, train=False)

    @property
    def num_samples(self) -> int:
        return len(self.sampler.indices())

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_sample)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.batches()
        if self.background or self.device.type == "cuda":  # copies and normalisation off the step's stream
            return in_background(batches, self.device)
        return batches

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised batches on the device, in order (run by :meth:`__iter__`, maybe in a thread)."""
        raise NotImplementedError

    def _skip(self, message: str) -> None:
        if self.strict:
            raise ReslabError(f"unreadable image {message} (drop --strict to skip such files)")
        print(f"reslab: skipping {message}", file=sys.stderr)
        self.skipped.append(message)


class FolderLoader(FileLoader):
    """A DataLoader over image files with the same interface as :class:`TensorLoader`.

    Workers decode and transform to uint8 (``geometry``; ``eval_geometry`` for the evaluation
    twin); batches are normalised on the device. Unreadable files are reported on stderr by name
    and skipped, or raise with ``strict``. ``draft``: JPEG DCT scaling for large training crops.
    """

    collate = staticmethod(collate_skipping)

    def __init__(self, *args, draft: bool = False, **kwargs) -> None:
        self.draft = draft  # training loaders only: the evaluation twin never drafts
        super().__init__(*args, **kwargs)

    def files(self, samples: list[tuple[str, int]]) -> Dataset:
        return ImageFiles(samples, self.geometry, self.channels, self.draft and self.train)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, skipped in self.loader:
            for msg in skipped:
                self._skip(msg)
            if len(y) == 0:
                continue
            yield self.normalize(x, self.place.channels_last), y.to(self.device, non_blocking=True)
