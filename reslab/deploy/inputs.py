"""Real inputs for verifying and calibrating deployed models: never random noise."""

from __future__ import annotations

from pathlib import Path

import torch

from reslab.data import Placement, build_data, checkpoint_data, image_loader, list_images
from reslab.engine import Checkpoint
from reslab.errors import ReslabError


def real_inputs(ckpt: Checkpoint, images: str | Path | None = None, n: int = 16) -> torch.Tensor:
    """Up to ``n`` real, preprocessed inputs (on the CPU) for a checkpoint: from ``images`` (a folder
    or file), else from the test split of the data it was trained on."""
    if images is not None:
        files = list_images([str(images)])[:n]
        batches = [x for x, _ in image_loader(files, ckpt.preprocess, batch_size=n, workers=0)]
        if not batches:
            raise ReslabError(f"{images}: no readable image")
        return torch.cat(batches)[:n]
    if not (ckpt.config or {}).get("data"):
        raise ReslabError(f"{ckpt.path}: no record of its data; pass --images DIR with a few real images")
    cfg, seed = checkpoint_data(ckpt.config, eval_batch_size=n)
    pre = ckpt.preprocess
    loader = build_data(
        cfg, place=Placement(seed=seed), channels=pre.channels, preprocess=pre, progress=False
    ).eval
    return next(iter(loader))[0][:n].cpu()
