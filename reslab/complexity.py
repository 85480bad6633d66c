"""Facts about a model, computed by building and running it, never typed in.

Models are built and run on the ``meta`` device: shapes propagate and PyTorch's FLOP counter
sees every conv and matmul, but no memory is allocated and no arithmetic is done, so the whole
zoo is measured in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from reslab.models import create_model, get_model_entry
from reslab.models.resnet import TRANSFORMS


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass (convs and matmuls, as torchvision's GFLOPS)."""
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(input_shape, device=device))
    return counter.get_total_flops() // 2


def input_shape(name: str, in_chans: int = 3, batch: int = 1) -> tuple[int, ...]:
    """The default input shape of a registered model (N, C, [T,] H, W)."""
    return (batch, in_chans, *get_model_entry(name).spec.input_size)


def model_stats(name: str, *, cache: bool = True) -> dict[str, Any]:
    """Parameters, GFLOPs (multiply-adds) and layer count of a registered model at its default size.

    Counting a 1,202-layer net takes seconds even on the meta device, so results are cached on
    disk, keyed by the spec and the torch version: a changed spec is counted again.
    """
    entry = get_model_entry(name)
    key = hashlib.sha1(f"{name}|{entry.spec}|{torch.__version__}".encode()).hexdigest()[:16]
    path = cache_dir() / "complexity.json"
    stored = _read_json(path) if cache else {}
    if key in stored:
        return stored[key]
    with torch.device("meta"):
        model = create_model(name).eval()
    stats = {
        "name": name,
        "family": entry.family,
        "params": count_params(model),
        "gflops": count_macs(model, input_shape(name)) / 1e9,
        "input_size": list(entry.spec.input_size),
        "layers": entry.spec.num_layers,
        "num_classes": model.num_classes,
    }
    if cache:
        stored = _read_json(path)  # re-read: another process may have added entries meanwhile
        stored[key] = stats
        _write_json(path, stored)
    return stats


def cache_dir() -> Path:
    """Where reslab caches derived data: ``$RESLAB_CACHE``, else ``~/.cache/reslab``."""
    root = (
        os.environ.get("RESLAB_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reslab"
    )
    return Path(root)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home is no reason to fail: the numbers are recomputed next time


def stage_table(name: str, **overrides: Any) -> list[dict[str, Any]]:
    """The architecture by stage: blocks, branch widths, stride and output shape at the default size."""
    spec = get_model_entry(name).spec
    with torch.device("meta"):
        model = create_model(name, **overrides).eval()
        feats = model.forward_intermediates(torch.empty(input_shape(name)))
    stem = nn.ModuleList(getattr(model, n) for n in model.stem_names)
    rows = [
        {
            "stage": "stem",
            "blocks": 0,
            "widths": str(spec.stem_width),
            "stride": model.feature_info[0]["reduction"],
            "output": tuple(feats[0].shape[1:]),
            "params": count_params(stem),
        }
    ]
    in_chs = spec.stem_width
    for info, feat, planes, depth in zip(
        model.feature_info[1:], feats[1:], spec.widths, spec.depths, strict=True
    ):
        convs = TRANSFORMS[spec.block](in_chs, planes, 1, spec.groups, spec.base_width, (1, 1))
        rows.append(
            {
                "stage": info["module"],
                "blocks": depth,
                "widths": "-".join(str(c.out_chs) for c in convs),
                "stride": info["reduction"],
                "output": tuple(feat.shape[1:]),
                "params": count_params(getattr(model, info["module"])),
            }
        )
        in_chs = info["num_chs"]
    return rows
