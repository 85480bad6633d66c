"""Every registered model, driven by the registry: forward, backward, features, classifier reset.

Each architecture is built with at most two blocks per stage (``compact_model``): the same code
paths as the full network at a fraction of its cost.
"""

from __future__ import annotations

import pytest
import torch

from reslab import list_models
from tests.conftest import compact_model, small_input

ALL = list_models()


@pytest.mark.parametrize("name", ALL)
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = compact_model(name, num_classes=7)
    x = small_input(name)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads), "every parameter should receive a gradient"


# Eval-mode tests start every block as identity (zero_init_residual): with fresh BN statistics,
# an untrained ResNet-1202's activations overflow after 600 additions.
@pytest.mark.parametrize("name", ALL)
def test_features_only(name: str) -> None:
    model = compact_model(name, features_only=True, zero_init_residual=True).eval()
    x = small_input(name, batch=1)
    with torch.no_grad():
        feats = model(x)
    assert len(feats) == len(model.feature_info)
    for f, info in zip(feats, model.feature_info, strict=True):
        assert f.shape[1] == info["num_chs"]
        assert f.shape[-1] == -(-x.shape[-1] // info["reduction"]), info
    # out_indices picks levels, counting from the end with negatives
    picked = compact_model(name, features_only=True, out_indices=(1, -1), zero_init_residual=True).eval()
    with torch.no_grad():
        two = picked(x)
    assert [t.shape for t in two] == [feats[1].shape, feats[-1].shape]


@pytest.mark.parametrize("name", ALL)
def test_head_interface(name: str) -> None:
    model = compact_model(name, zero_init_residual=True).eval()
    x = small_input(name, batch=1)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        assert pooled.shape == (1, model.num_features)
        assert torch.allclose(logits, model(x))
        model.reset_classifier(3)
        assert model(x).shape == (1, 3)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)
