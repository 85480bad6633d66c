"""What studies read: checkpoints on a device, fixed sets of real images, the data to train on."""

from __future__ import annotations

from typing import Any

import torch

from reslab.config import data_name
from reslab.data import fixed_batches
from reslab.engine import Checkpoint, read_checkpoint, resolve_device


def load_checkpoints(paths: list[str], model: str | None = None, device: str = "auto") -> list[Checkpoint]:
    """Checkpoints (reslab's, or bare state dicts of ``model``) on ``device``."""
    dev = resolve_device(device)
    return [read_checkpoint(path, model, dev) for path in paths]


def checkpoint_batches(
    ckpt: Checkpoint, split: str, limit: int, data: str | None = None, data_dir: str | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of real images for a checkpoint (see :func:`reslab.data.fixed_batches`), on its device."""
    device = next(ckpt.model.parameters()).device
    return fixed_batches(
        ckpt.config, ckpt.preprocess, split=split, limit=limit, data=data, data_dir=data_dir, device=device
    )


def data_fields(data: str | None, data_dir: str | None) -> dict[str, Any]:
    """The data a study trains on: as named (:func:`reslab.config.data_name`), else the embedded default."""
    return {"name": data_name(data, data_dir) or "default", **({"dir": data_dir} if data_dir else {})}
