"""Conv + BatchNorm folding for inference.

In eval mode a BatchNorm is a per-channel affine map, so when it reads a conv's output directly
it can be folded into that conv's weights and bias. Which BN follows which conv is read off the
traced graph rather than assumed from the block layout, so every family (post- and
pre-activation, deep stems, (2+1)D convs, projection shortcuts) folds through one code path.
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops import FrozenBatchNorm2d

from reslab.models.layers import NORM_TYPES

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (*NORM_TYPES, FrozenBatchNorm2d))


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, norm) module names where the norm's only input is the conv's output and the conv
    feeds nothing else."""
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_norm(modules[node.target]):
            continue
        src = node.args[0]
        # look through no-op modules in between (e.g. a disabled dropout)
        while (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules[src.target], nn.Identity)
            and len(src.users) == 1
        ):
            src = src.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules[src.target], _CONVS)
            and len(src.users) == 1
        ):
            pairs.append((src.target, node.target))
    return pairs


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every foldable BatchNorm merged into its conv.

    The copy keeps its class and interface; folded norms become ``nn.Identity``. Norms that do not
    read a conv's output directly (the BN-ReLU at the input of a pre-activation block) stay.
    """
    model = copy.deepcopy(model).eval()
    pairs = conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        fused = copy.deepcopy(conv)
        fused.weight, fused.bias = weight, bias
        _replace(model, conv_name, fused)
        _replace(model, bn_name, nn.Identity())
    model.folded_norms = len(pairs)
    return model
