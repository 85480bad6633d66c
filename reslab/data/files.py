"""Loading files a user names (predict, embed, export, eval of folders): listing them and batching
them with a checkpoint's preprocessing, decoded by workers or in batches on the device."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from reslab.data.batched import BatchDecodeLoader, choose_decode
from reslab.data.folder import FolderLoader
from reslab.data.loader import Loader, Placement, default_workers
from reslab.data.preprocess import Preprocess
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
    decode: str = "auto",
) -> Loader:
    """Batches of (normalised images, file indices) for a list of files, with a checkpoint's
    preprocessing: decoded by DataLoader workers, or in batches on the device (``decode``, as
    ``data.decode``). Unreadable files are named on stderr and skipped (their indices are absent),
    or raise with ``strict``."""
    device = torch.device(device)
    workers = default_workers() if workers is None else workers
    workers = workers if len(files) > batch_size else 0
    samples = [(str(f), i) for i, f in enumerate(files)]
    geometry = pre.geometry()
    chosen, _ = choose_decode(decode, device, samples, geometry, pre.channels, workers)
    loader = BatchDecodeLoader if chosen == "gpu" else FolderLoader
    return loader(
        samples,
        geometry,
        batch_size=batch_size,
        train=False,
        channels=pre.channels,
        workers=workers,
        mean=pre.mean,
        std=pre.std,
        place=Placement(device=device),
        strict=strict,
    )
