"""Layer plug-ins: conv makers, norms, shortcuts and attention, each for 2D images or 3D clips.

Blocks never construct a layer type directly; they call these makers, so a new behaviour (a
(2+1)D conv, another shortcut, another attention) is a new maker, not a new network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[[], nn.Module]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_BN = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_AVGPOOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}


def default_norm(ndim: int) -> NormLayer:
    return _BN[ndim]


def default_act() -> nn.Module:
    return nn.ReLU(inplace=True)


@dataclass(frozen=True)
class ConvSpec:
    """One conv of a residual transform. ``kernel``, ``stride`` and ``dilation`` are spatial."""

    in_chs: int
    out_chs: int
    kernel: int = 3
    stride: int = 1
    groups: int = 1
    dilation: int = 1
    # The (in, out) channels whose full t x d x d conv a (2+1)D factorisation matches in
    # parameter count (Tran et al. 2018, Sec. 3.5). torchvision computes it once per block from
    # the block's (in_chs, planes) and uses it for every conv of the block; we do the same so
    # that its checkpoints load.
    match_chs: tuple[int, int] | None = None


class ConvMaker:
    """Builds the convs of one stage for one dimensionality and factorisation.

    ``kind`` is "standard" (k x k, or k x k x k for clips), "no_temporal" (1 x k x k: a 2D conv
    applied frame by frame, as in MC3's upper stages) or "2plus1d" (1 x k x k then k x 1 x 1, with
    a norm and activation in between: R(2+1)D).
    """

    def __init__(self, kind: str, ndim: int, norm_layer: NormLayer, act_layer: ActLayer) -> None:
        if ndim == 2 and kind != "standard":
            raise ValueError(f"conv kind {kind!r} needs ndim=3")
        self.kind, self.ndim, self.norm_layer, self.act_layer = kind, ndim, norm_layer, act_layer

    def stride(self, s: int) -> int | tuple[int, ...]:
        """The stride tuple a spatial stride ``s`` becomes (frame-wise convs keep time)."""
        return (1, s, s) if self.kind == "no_temporal" else s

    def __call__(self, c: ConvSpec) -> nn.Module:
        pad = c.dilation * (c.kernel // 2)
        if self.ndim == 2 or c.kernel == 1 or self.kind == "standard":
            return _CONV[self.ndim](
                c.in_chs, c.out_chs, c.kernel, c.stride, pad, c.dilation, c.groups, bias=False
            )
        k, s, d = c.kernel, c.stride, c.dilation
        if self.kind == "no_temporal":
            return nn.Conv3d(
                c.in_chs, c.out_chs, (1, k, k), (1, s, s), (0, pad, pad), (1, d, d), c.groups, bias=False
            )
        m_in, m_out = c.match_chs or (c.in_chs, c.out_chs)
        mid = (m_in * m_out * k**3) // (m_in * k * k + k * m_out)
        return nn.Sequential(
            nn.Conv3d(c.in_chs, mid, (1, k, k), (1, s, s), (0, pad, pad), (1, d, d), bias=False),
            self.norm_layer(mid),
            self.act_layer(),
            nn.Conv3d(mid, c.out_chs, (k, 1, 1), (s, 1, 1), (pad, 0, 0), (d, 1, 1), bias=False),
        )


class PadShortcut(nn.Module):
    """Option A: subsample by the stride and zero-pad the new channels, half on each side.

    Parameter-free. The even split matches the common PyTorch CIFAR reproductions (the paper only
    says "extra zero entries padded"), so their checkpoints load unchanged.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int | tuple[int, ...], ndim: int) -> None:
        super().__init__()
        strides = stride if isinstance(stride, tuple) else (stride,) * ndim
        self.index = (slice(None), slice(None), *(slice(None, None, s) for s in strides))
        extra = out_chs - in_chs
        self.pad = (0, 0) * ndim + (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[self.index], self.pad)


def shortcut_problem(kind: str, in_chs: int, out_chs: int) -> str | None:
    """Why ``kind`` cannot join a branch of ``in_chs -> out_chs``, or None when it can."""
    if kind == "A" and out_chs < in_chs:
        return "option A can only pad channels, not remove them"
    return None


def make_shortcut(
    kind: str,
    in_chs: int,
    out_chs: int,
    stride: int,
    conv: ConvMaker,
    *,
    preact: bool = False,
) -> nn.Module | None:
    """The shortcut module for one block, or None for identity (and for plain nets).

    A/B/C are the paper's options (Sec. 3.3): A pads, B projects only where the shape changes,
    C projects everywhere. D is B with the stride moved to an average pool before the 1x1 conv
    ("Bag of Tricks", ResNet-D), so no activations are skipped. Pre-activation projections have
    no norm: the block's input is already normalised (He et al. 2016).
    """
    changes = stride != 1 or in_chs != out_chs
    if kind == "none" or (kind != "C" and not changes):
        return None
    s = conv.stride(stride)
    if kind == "A":
        return PadShortcut(in_chs, out_chs, s, conv.ndim)
    layers: list[nn.Module] = []
    if kind == "D":
        # timm's avg-down: the pool keeps index 0 even when it has nothing to do, so keys match.
        layers.append(
            _AVGPOOL[conv.ndim](2, s, ceil_mode=True, count_include_pad=False)
            if stride > 1
            else nn.Identity()
        )
        s = 1
    layers.append(_CONV[conv.ndim](in_chs, out_chs, 1, s, bias=False))
    if not preact:
        layers.append(conv.norm_layer(out_chs))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): channel gates from globally pooled features."""

    def __init__(self, channels: int, ndim: int = 2, rd_ratio: float = 1 / 16, divisor: int = 8) -> None:
        super().__init__()
        rd = max(divisor, int(channels * rd_ratio + divisor / 2) // divisor * divisor)
        self.fc1 = _CONV[ndim](channels, rd, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = _CONV[ndim](rd, channels, 1)
        self.dims = tuple(range(2, 2 + ndim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(self.act(self.fc1(x.mean(self.dims, keepdim=True))))
        return x * s.sigmoid()


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop the whole branch for random samples while training.

    Survivors are scaled by 1/(1-p) so that the expected output is unchanged at test time.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep.div_(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine map (buffers, not parameters), for 2D and 3D
    inputs alike: what a frozen part of a network computes whatever mode it is in.

    State-dict keys are torchvision's ``FrozenBatchNorm2d``'s (no step counter), so weights move
    between the two.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), fill))

    @classmethod
    @torch.no_grad()
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNorm:
        frozen = cls(bn.num_features, bn.eps).to(bn.running_mean.device)
        if bn.affine:
            frozen.weight.copy_(bn.weight)
            frozen.bias.copy_(bn.bias)
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm's counter: nowhere to go
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * scale.view(shape) + shift.view(shape)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (any dimension) inside ``module`` by a :class:`FrozenBatchNorm`."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, FrozenBatchNorm.from_batchnorm(child))
        else:
            freeze_batchnorm(child)
    return module


NORM_TYPES = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm)


ATTN_LAYERS: dict[str, Callable[..., nn.Module]] = {"se": SqueezeExcite}
