"""Shared fixtures: registry-driven parameters, small inputs, and the real data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from reslab.models import ResNet, get_model_entry

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: the workers share the cores
    torch.set_num_threads(1)

SHARED_DATA = Path(
    os.environ.get("RESLAB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read or write the user's cache, and never download."""
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path_factory.getbasetemp() / "reslab-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch-home"))


def small_input(name: str, batch: int = 2, in_chans: int = 3) -> torch.Tensor:
    """A small input the model accepts: 32x32 for CIFAR nets, 64x64 for ImageNet nets, short clips."""
    spec = get_model_entry(name).spec
    size = (4, 32, 32) if spec.ndim == 3 else ((32, 32) if spec.input_size[-1] <= 32 else (64, 64))
    return torch.randn(batch, in_chans, *size, generator=torch.Generator().manual_seed(0))


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; skips the test when the real data is not on this machine."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


def compact_model(name: str, **options) -> ResNet:
    """The registered architecture with at most two blocks per stage: every code path of the full
    network (each stage's reshaping first block and an identity block) at a fraction of the cost,
    for the registry-driven tests. The full-size networks are built by the parity tests (against
    torchvision and timm) and counted on the meta device by the complexity tests."""
    spec = get_model_entry(name).spec
    keep = [min(d, 2) for d in spec.depths]
    widths = None
    if spec.block_widths:
        starts = [sum(spec.depths[:s]) for s in range(len(spec.depths))]
        widths = tuple(
            spec.block_widths[start + i] for start, k in zip(starts, keep, strict=True) for i in range(k)
        )
    model = ResNet(spec.replace(depths=tuple(keep), block_widths=widths), **options)
    model.name = name
    return model
