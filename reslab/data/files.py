"""Loading files a user names (predict, embed, export, eval of folders): listing them and batching
them with a checkpoint's preprocessing, decoded by PIL in workers or in batches on the device."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from reslab.data.decode import BatchDecodeLoader, geometry_problem, use_batch_decoding
from reslab.data.folder import FolderLoader
from reslab.data.loader import Loader, Placement
from reslab.data.preprocess import Preprocess, eval_transform
from reslab.data.sources import IMG_EXTENSIONS
from reslab.errors import ReslabError


def list_images(inputs: list[str], strict: bool = False) -> list[Path]:
    """Image files named directly or found in folders; other files in folders are reported (or, with
    ``strict``, refused)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            others = [f for f in found if f.suffix.lower() not in IMG_EXTENSIONS]
            for f in others:
                if strict:
                    raise ReslabError(f"{f}: not an image file (drop --strict to skip such files)")
                print(f"reslab: skipping {f}: not an image file", file=sys.stderr)
            files.extend(f for f in found if f.suffix.lower() in IMG_EXTENSIONS)
        elif p.exists():
            files.append(p)
        else:
            raise ReslabError(f"{p}: no such file or folder")
    if not files:
        raise ReslabError(f"no images found in {', '.join(inputs)}")
    return files


def image_loader(
    files: list[Path],
    pre: Preprocess,
    batch_size: int = 64,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    strict: bool = False,
    draft: bool = False,
    decode: str = "auto",
) -> Loader:
    """Batches of (normalised images, file indices) for a list of files.

    Decoded by PIL in DataLoader workers, or (``decode``: auto on CUDA, or gpu) read by workers
    and decoded a batch at a time on the device, for the resize-and-crop geometry of ImageNet-style
    models. Unreadable files are named on stderr and skipped (their indices are absent), or raise
    with ``strict``. ``draft`` lets PIL's JPEG decoder downscale while decoding (faster, not exact).
    """
    device = torch.device(device)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    workers = workers if len(files) > batch_size else 0
    samples = [(str(f), i) for i, f in enumerate(files)]
    normalise = dict(channels=pre.channels, workers=workers, mean=pre.mean, std=pre.std, strict=strict)
    place = Placement(device=device)
    if use_batch_decoding(decode, device, geometry_problem(pre.resize, pre.interpolation)):
        return BatchDecodeLoader(
            samples,
            batch_size=batch_size,
            train=False,
            size=pre.crop,
            resize=pre.resize,
            place=place,
            **normalise,
        )
    return FolderLoader(
        [(str(f), i) for i, f in enumerate(files)],
        eval_transform(pre),
        batch_size=batch_size,
        train=False,
        place=place,
        draft=pre.resize if draft and pre.resize else None,
        **normalise,
    )
