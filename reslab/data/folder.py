"""Folders of large images: decoded on the fly by DataLoader workers with torchvision transforms v2.

Each sample's augmentation is seeded by (seed, epoch, index) rather than by a worker's RNG
stream, so the batches do not depend on the number of workers and a resumed run sees the
same crops as an uninterrupted one. Undecodable files are skipped and reported by name.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from reslab.data.memory import step_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_transforms(train: bool, size: int, resize: int, mean, std):
    """ImageNet-style transforms: random-resized crop + flip for training, resize + center crop for eval."""
    from torchvision.transforms import v2

    common = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if train:
        return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *common])
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size), *common])


class ImageFiles(Dataset):
    """(path, label) pairs -> transformed tensors; ``None`` for a file that cannot be decoded."""

    def __init__(self, samples: list[tuple[str, int]], transform, channels: int = 3) -> None:
        self.samples, self.transform = samples, transform
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int] | None:
        index, seed = item
        path, label = self.samples[index]
        from PIL import Image

        try:
            with Image.open(path) as im:
                img = im.convert(self.mode)  # grey photos become RGB (and vice versa) here
        except Exception as e:
            print(f"reslab: skipping {path}: {type(e).__name__}: {e}", file=sys.stderr)
            return None
        torch.manual_seed(seed)
        return self.transform(img), label


class SeededSampler(Sampler):
    """Yields (index, sample seed): a per-epoch permutation (or the natural order), sharded by rank."""

    def __init__(
        self, n: int, *, shuffle: bool, seed: int, batch_size: int, rank: int = 0, world: int = 1
    ) -> None:
        self.n, self.shuffle, self.seed, self.batch_size = n, shuffle, seed, batch_size
        self.rank, self.world = rank, world
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(step_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        return order[self.rank :: self.world].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx = self.indices()[self.start_step * self.batch_size :]
        for i in idx:
            yield i, step_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.start_step * self.batch_size)


def collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    good = [b for b in batch if b is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), len(batch)
    x = torch.stack([b[0] for b in good])
    y = torch.tensor([b[1] for b in good], dtype=torch.int64)
    return x, y, len(batch) - len(good)


class FolderLoader:
    """A DataLoader over image files with the same interface as :class:`TensorLoader`."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform,
        *,
        batch_size: int,
        train: bool,
        channels: int,
        workers: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.device = torch.device(device)
        self.train, self.batch_size, self.channels_last = train, batch_size, channels_last
        self.sampler = SeededSampler(len(samples), shuffle=train, seed=seed, batch_size=batch_size,
                                     rank=rank, world=world)  # fmt: skip
        self.loader = DataLoader(
            ImageFiles(samples, transform, channels),
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate_skipping,
            drop_last=train,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
        )
        self.skipped = 0

    @property
    def num_samples(self) -> int:
        return len(self.sampler.indices())

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, skipped in self.loader:
            self.skipped += skipped
            if len(y) == 0:
                continue
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)
