"""reslab networks as detection and segmentation backbones for torchvision's detection models.

``fpn_backbone`` returns what ``torchvision.models.detection.FasterRCNN``/``MaskRCNN`` expect: a
module with ``out_channels`` whose forward returns an ordered dict of feature maps. BatchNorm is
frozen by default (:class:`FrozenBatchNorm`): detection batches are a few images per device, far
too small for batch statistics.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from reslab.errors import ReslabError
from reslab.models import ResNet, create_model
from reslab.models.layers import FrozenBatchNorm
from reslab.weights import load_weights


class FPNBackbone(nn.Module):
    """A ``features_only`` reslab network followed by torchvision's feature pyramid network."""

    def __init__(self, body: ResNet, out_channels: int = 256, extra_blocks: nn.Module | None = None) -> None:
        super().__init__()
        if not body.features_only:
            raise ReslabError("FPNBackbone needs a features_only model")
        self.body = body
        in_channels = [body.feature_info[i]["num_chs"] for i in body.out_indices]
        self.fpn = FeaturePyramidNetwork(
            in_channels, out_channels, extra_blocks=extra_blocks or LastLevelMaxPool()
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = OrderedDict((str(i), f) for i, f in enumerate(self.body(x)))
        return self.fpn(feats)


def fpn_backbone(
    name: str,
    *,
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    trainable_stages: int = 3,
    returned_stages: tuple[int, ...] = (1, 2, 3, 4),
    out_channels: int = 256,
    frozen_bn: bool = True,
    **overrides: Any,
) -> FPNBackbone:
    """A torchvision-compatible FPN backbone from a registered 2D model (as torchvision's
    ``resnet_fpn_backbone``: stages 1-4 into the pyramid, the stem and all but the last
    ``trainable_stages`` stages frozen)."""
    if frozen_bn:
        overrides.setdefault("norm_layer", FrozenBatchNorm)
    body = create_model(name, features_only=True, out_indices=returned_stages, **overrides)
    if body.spec.ndim != 2:
        raise ReslabError(f"{name} is a video model; FPN backbones are 2D")
    n = len(body.stage_names)
    if not 0 <= trainable_stages <= n:
        raise ReslabError(f"trainable_stages={trainable_stages}: {name} has {n} stages")
    if weights is not None:
        load_weights(body, weights)
    body.set_trainable(1 + n - trainable_stages)
    return FPNBackbone(body, out_channels)
