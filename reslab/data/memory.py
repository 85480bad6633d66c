"""Batches from images held in memory as uint8, augmented a whole batch at a time on the device.

No per-sample Python runs in the hot loop: a batch is one index into the uint8 tensor, one
gather for the random crops, one ``where`` for the flips and one fused normalisation. Every
random choice comes from a generator seeded by (seed, epoch, step), so a run resumed in the
middle of an epoch sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch

from reslab.data.loader import Placement, Uint8Normalizer, shard_order, step_seed


def random_crop_flip(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Pad by ``pad`` zeros, crop back to size at a random offset per image, mirror half of them.

    The paper's CIFAR augmentation (Sec. 4.2): "4 pixels are padded on each side, and a 32x32
    crop is randomly sampled from the padded image or its horizontal flip".
    """
    if x.ndim == 5:  # clips: the same crop and flip for every frame of a clip
        n, c, t = x.shape[:3]
        return random_crop_flip(x.reshape(n, c * t, *x.shape[3:]), pad, flip, generator).reshape(x.shape)
    n, _, h, w = x.shape
    dev = x.device
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (n, 1, h, 1)
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (n, 1, 1, w)
        batch = torch.arange(n, device=dev)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=dev)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if flip:
        mirror = torch.rand(n, generator=generator, device=dev) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


class TensorLoader:
    """Iterates (images, labels) batches from uint8 tensors kept on ``device``.

    Training loaders shuffle with a per-epoch permutation, drop the last partial batch (so every
    iteration has the same batch size, as the paper counts iterations) and augment; evaluation
    loaders keep the order and every sample. ``rank``/``world`` shard the data for DDP: each
    process takes every ``world``-th index of the shared permutation.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        train: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: str = "none",
        pad: int = 4,
        place: Placement | None = None,
    ) -> None:
        place = place or Placement()
        self.device = place.device
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.train, self.augment, self.pad = batch_size, train, augment, pad
        self.place = place
        self.normalize = Uint8Normalizer(mean, std, images.ndim, self.device)
        self.epoch, self.start_sample = 0, 0
        self.skipped: list[str] = []  # decoded up front: unreadable files were reported then

    def as_eval(self, batch_size: int | None = None) -> TensorLoader:
        """The same images in their natural order, every one, without augmentation."""
        view = copy.copy(self)
        view.train, view.batch_size = False, batch_size or self.batch_size
        return view

    @property
    def num_samples(self) -> int:
        """Samples this process sees per epoch."""
        n, rank, world = len(self.labels), self.place.rank, self.place.world
        return (n - rank + world - 1) // world

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """The epoch to iterate next, skipping the first ``start_sample`` samples of its order, counted
        over all processes (mid-epoch resume, also with another number of processes)."""
        self.epoch, self.start_sample = epoch, start_sample

    def _order(self) -> torch.Tensor:
        p = self.place
        return shard_order(
            len(self.labels),
            shuffle=self.train,
            seed=p.seed,
            epoch=self.epoch,
            start=self.start_sample if self.train else 0,
            rank=p.rank,
            world=p.world,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order().to(self.device)
        b = self.batch_size
        skipped = self.start_sample // (b * self.place.world)  # batches the earlier part of the epoch took
        self.start_sample = 0
        gen = torch.Generator(device=self.device)
        steps = len(order) // b if self.train else -(-len(order) // b)
        for i in range(steps):
            step = skipped + i
            idx = order[i * b : (i + 1) * b]
            x = self.images[idx]
            if self.train and self.augment != "none":
                gen.manual_seed(step_seed(self.place.seed + 1 + self.place.rank, self.epoch, step))
                x = random_crop_flip(
                    x, self.pad if "crop" in self.augment else 0, "flip" in self.augment, gen
                )
            yield self.normalize(x, self.place.channels_last), self.labels[idx]
