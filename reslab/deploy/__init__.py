"""Deployment: BN folding, export with verification, int8 quantization and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reslab.deploy.fold import conv_bn_pairs, fold_batchnorm
from reslab.errors import ReslabError

__all__ = ["conv_bn_pairs", "fold_batchnorm", "real_inputs"]


def real_inputs(meta: dict[str, Any], images: str | Path | None = None, n: int = 16) -> torch.Tensor:
    """Up to ``n`` real, preprocessed inputs for a checkpoint: from ``images`` (a folder or file),
    else from the test split of the data it was trained on."""
    from reslab.inference import image_loader, list_images

    if images is not None:
        files = list_images([str(images)])[:n]
        batches = [x for x, _ in image_loader(files, meta["preprocess"], batch_size=n, workers=0)]
        if not batches:
            raise ReslabError(f"{images}: no readable image")
        return torch.cat(batches)[:n]
    from reslab.data import build_data, checkpoint_data

    if not (meta.get("config") or {}).get("data"):
        raise ReslabError(f"{meta['path']}: no record of its data; pass --images DIR with a few real images")
    cfg, seed = checkpoint_data(meta, eval_batch_size=n)
    loader = build_data(
        cfg, seed=seed, channels=meta["preprocess"]["channels"], preprocess=meta["preprocess"], progress=False
    ).eval
    return next(iter(loader))[0][:n].cpu()
