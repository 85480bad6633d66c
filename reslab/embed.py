"""Embeddings for visual search: L2-normalised penultimate-layer features, and nearest neighbours.

An index is two files: ``NAME.npy`` (float32, one unit-length row per image) and ``NAME.json``
(the image paths, the checkpoint and the architecture), so it can be searched without reslab.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from reslab.config import json_text
from reslab.data import Preprocess, first_batch, image_loader, list_images
from reslab.data.loader import nothing_readable
from reslab.engine import read_checkpoint
from reslab.engine.device import Precise, resolve_precision
from reslab.errors import ReslabError
from reslab.weights import guard_output


class PreLogits(torch.nn.Module):
    """A classifier's penultimate features: what an embedding is."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


@torch.no_grad()
def embed_files(
    net: torch.nn.Module,
    preprocess: Preprocess,
    files: list[Path],
    batch_size: int = 64,
    progress: bool = True,
    precision: str = "fp32",
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Unit-length pre-logits features of each readable image, the files they belong to, and the
    precision used (``auto``: fp32 on CPUs, the faster of bf16 and fp16 on CUDA)."""
    device = next(net.parameters()).device
    chunks, kept = [], []
    loader = image_loader(files, preprocess, batch_size, device=device)
    chosen = resolve_precision(
        precision,
        lambda p: Precise(PreLogits(copy.deepcopy(net)), p),
        lambda: first_batch(loader),
        device,
        agreement=False,  # features have no classes to agree on
    )
    features = Precise(PreLogits(net), chosen["precision"])
    for x, idx in tqdm(
        loader, total=len(loader), unit="batch", desc="embedding", disable=not progress, leave=False
    ):
        chunks.append(F.normalize(features(x), dim=1).cpu().numpy())
        kept.extend(str(files[i]) for i in idx.tolist())
    if not chunks:
        raise nothing_readable(loader)
    return np.concatenate(chunks), kept, chosen


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
    precision: str = "auto",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Embed every image of ``inputs`` with a checkpoint's network; write ``out`` (+ its JSON)."""
    npy, sidecar = _index_paths(out)
    for path, kind in ((npy, "NumPy array"), (sidecar, "JSON")):
        guard_output(path, kind, inputs=(checkpoint, *inputs), overwrite=overwrite)
    ckpt = read_checkpoint(checkpoint, model, device)
    emb, files, chosen = embed_files(
        ckpt.model, ckpt.preprocess, list_images(inputs), progress=progress, precision=precision
    )
    npy.parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, emb)
    info = {
        "files": files,
        "checkpoint": str(Path(checkpoint).resolve()),
        "arch": ckpt.arch,
        "dim": emb.shape[1],
        "model": model,
        "precision": chosen["precision"],
    }
    sidecar.write_text(json_text(info))
    return {
        "embeddings": str(npy),
        "files": str(sidecar),
        "count": len(files),
        "dim": emb.shape[1],
        "precision": chosen,
    }


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
    # queries in the index's precision, so that similarities compare like with like
    q, qfiles, _ = embed_files(
        ckpt.model,
        ckpt.preprocess,
        list_images(queries),
        progress=False,
        precision=info.get("precision", "fp32"),
    )
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
