"""Embeddings for visual search: L2-normalised penultimate-layer features, and nearest neighbours.

An index is two files: ``NAME.npy`` (float32, one unit-length row per image) and ``NAME.json``
(the image paths, the checkpoint and the architecture), so it can be searched without reslab.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from reslab.data import Preprocess, image_loader, list_images
from reslab.engine import read_checkpoint
from reslab.errors import ReslabError


@torch.no_grad()
def embed_files(
    net: torch.nn.Module,
    preprocess: Preprocess,
    files: list[Path],
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[np.ndarray, list[str]]:
    """Unit-length pre-logits features of each readable image, and the files they belong to."""
    device = next(net.parameters()).device
    chunks, kept = [], []
    loader = image_loader(files, preprocess, batch_size, device=device)
    for x, idx in tqdm(
        loader, total=len(loader), unit="batch", desc="embedding", disable=not progress, leave=False
    ):
        feats = net.forward_head(net.forward_features(x), pre_logits=True)
        chunks.append(F.normalize(feats.float(), dim=1).cpu().numpy())
        kept.extend(str(files[i]) for i in idx.tolist())
    if not chunks:
        raise ReslabError("no image could be read")
    return np.concatenate(chunks), kept


def _index_paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix not in ("", ".npy"):
        raise ReslabError(f"{path}: an index is written as NAME.npy (+ NAME.json); use a .npy name")
    return path.with_suffix(".npy"), path.with_suffix(".json")


def build_index(
    checkpoint: str,
    inputs: list[str],
    out: str | Path,
    *,
    model: str | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every image of ``inputs`` with a checkpoint's network; write ``out`` (+ its JSON)."""
    ckpt = read_checkpoint(checkpoint, model, device)
    emb, files = embed_files(ckpt.model, ckpt.preprocess, list_images(inputs), progress=progress)
    npy, sidecar = _index_paths(out)
    npy.parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, emb)
    info = {
        "files": files,
        "checkpoint": str(Path(checkpoint).resolve()),
        "arch": ckpt.arch,
        "dim": emb.shape[1],
        "model": model,
    }
    sidecar.write_text(json.dumps(info, indent=1))
    return {"embeddings": str(npy), "files": str(sidecar), "count": len(files), "dim": emb.shape[1]}


def search(
    index: str | Path, queries: list[str], topk: int = 5, device: str | torch.device = "auto"
) -> list[dict[str, Any]]:
    """The ``topk`` most similar indexed images (cosine similarity) for each query image."""
    npy, sidecar = _index_paths(index)
    if not npy.exists() or not sidecar.exists():
        raise ReslabError(f"{npy}: no index here (build one with reslab embed --out {npy})")
    emb = torch.from_numpy(np.load(npy))
    info = json.loads(sidecar.read_text())
    ckpt = read_checkpoint(info["checkpoint"], info.get("model"), device)
    q, qfiles = embed_files(ckpt.model, ckpt.preprocess, list_images(queries), progress=False)
    sims = torch.from_numpy(q) @ emb.T
    k = min(topk, emb.shape[0])
    best = sims.topk(k, dim=1)
    return [
        {
            "query": f,
            "matches": [{"file": info["files"][i], "similarity": s} for s, i in zip(vals, idx, strict=True)],
        }
        for f, vals, idx in zip(qfiles, best.values.tolist(), best.indices.tolist(), strict=True)
    ]
