"""What studies read: checkpoints on a device, fixed sets of real images, the data to train on."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from reslab.config import DataConfig, build, data_name, to_dict
from reslab.data import checkpoint_data, data_fingerprint, fixed_batches
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


def file_digest(path: str | Path) -> str:
    """A file's content, as a study's identity records it (the same weights under another name are
    the same input; other weights under the same name are not)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def checkpoints_identity(checkpoints: list[Checkpoint]) -> list[dict[str, Any]]:
    return [{"path": str(Path(c.path).resolve()), "sha256": file_digest(c.path)} for c in checkpoints]


def data_identity(fields: dict[str, Any]) -> dict[str, Any]:
    """A data config's kind, folder and files (:func:`reslab.data.data_fingerprint`)."""
    cfg = build(DataConfig, {k: v for k, v in fields.items() if k in DataConfig.__dataclass_fields__})
    return {"name": cfg.name, "dir": cfg.dir, "files": data_fingerprint(cfg)}


def checkpoint_data_identity(ckpt: Checkpoint, data: str | None = None, data_dir: str | None = None) -> dict:
    """The data a checkpoint's study reads: its recorded data, or ``data``/``data_dir``."""
    cfg, _ = checkpoint_data(ckpt.config, data=data, data_dir=data_dir, source=ckpt.path)
    return data_identity(to_dict(cfg))
