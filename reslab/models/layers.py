"""Layer plug-ins: conv makers, norms, shortcuts, attention and anti-aliasing, for 2D images and
3D clips.

Blocks never construct a layer type directly; they call these makers, so a new behaviour (a
(2+1)D conv, another shortcut, another attention) is a new maker, not a new network. The layer
types a spec names (``norm``, ``attn``, ``aa``) are looked up in the registries at the end of this
file, and ``create_model(..., norm_layer=, attn_layer=, aa_layer=)`` plugs in others by name or
as callables.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reslab.errors import ReslabError

NormLayer = Callable[[int], nn.Module]  # channels -> norm
ActLayer = Callable[[], nn.Module]
AttnLayer = Callable[..., nn.Module]  # (channels, ndim=...) -> attention on a branch's output
AALayer = Callable[[int, int], nn.Module]  # (channels, stride) -> anti-aliased downsampling

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_BN = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_AVGPOOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}


def default_act() -> nn.Module:
    return nn.ReLU(inplace=True)


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm (Wu & He 2018) for any number of spatial dimensions: 32 groups, as the paper and
    timm use, or for narrow layers (the CIFAR nets' 16 channels) the most groups that divide the
    channels and keep at least two channels each (16 channels: 8 groups)."""
    if channels % groups or channels // groups < 2 <= channels:
        groups = max((g for g in range(1, groups + 1) if channels % g == 0 and channels // g >= 2), default=1)
    return nn.GroupNorm(groups, channels)


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
    kernel: int = 1,
) -> nn.Module | None:
    """The shortcut module for one block, or None for identity (and for plain nets).

    A/B/C are the paper's options (Sec. 3.3): A pads, B projects only where the shape changes,
    C projects everywhere. D is B with the stride moved to an average pool before the 1x1 conv
    ("Bag of Tricks", ResNet-D), so no activations are skipped. Pre-activation projections have
    no norm: the block's input is already normalised (He et al. 2016). ``kernel`` > 1 makes
    strided B/C projections k x k convs (SENet-154's 3x3 downsampling).
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
    k = kernel if stride > 1 else 1
    layers.append(_CONV[conv.ndim](in_chs, out_chs, k, s, ((stride - 1) + (k - 1)) // 2, bias=False))
    if not preact:
        layers.append(conv.norm_layer(out_chs))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): channel gates from globally pooled features, through
    a bottleneck of ``channels * rd_ratio`` (rounded to a multiple of ``divisor``)."""

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


class EfficientChannelAttention(nn.Module):
    """ECA (Wang et al. 2020): channel gates from a 1D conv across the pooled channels, no bottleneck.

    The kernel size grows with the channels: ``t = int(|log2(C) + beta| / gamma)``, made odd, at
    least 3 (the paper's adaptive rule), unless ``kernel_size`` fixes it.
    """

    def __init__(
        self, channels: int, ndim: int = 2, kernel_size: int | None = None, gamma: float = 2, beta: float = 1
    ) -> None:
        super().__init__()
        if kernel_size is None:
            t = int(abs(math.log(channels, 2) + beta) / gamma)
            kernel_size = max(t if t % 2 else t + 1, 3)
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.dims = tuple(range(2, 2 + ndim))
        self.ones = (1,) * ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.mean(self.dims).unsqueeze(1)).sigmoid()  # (N, 1, C): a 1D signal over channels
        return x * y.view(x.shape[0], -1, *self.ones)


class AvgPoolAA(nn.AvgPool2d):
    """Anti-aliasing by averaging: a strided conv runs at stride 1 and a ``stride`` x ``stride`` average
    pool downsamples its output (timm's ResNet-AA). A pool itself, it also replaces the stem's max-pool."""

    replaces_pool = True

    def __init__(self, channels: int, stride: int = 2) -> None:
        super().__init__(stride)


class BlurPool(nn.Module):
    """Anti-aliasing by blurring before subsampling (Zhang 2019, "Making Convolutional Networks
    Shift-Invariant Again"): a fixed binomial filter, reflect-padded, applied per channel with the
    stride. In the stem it follows a stride-1 max-pool."""

    replaces_pool = False

    def __init__(self, channels: int, stride: int = 2, size: int = 3) -> None:
        super().__init__()
        self.channels, self.stride = channels, stride
        self.pad = [((stride - 1) + (size - 1)) // 2] * 4
        taps = torch.tensor([math.comb(size - 1, k) for k in range(size)], dtype=torch.float32) / 2 ** (
            size - 1
        )
        blur = (taps[:, None] * taps[None, :]).expand(channels, 1, size, size).contiguous()
        self.register_buffer("filt", blur, persistent=False)  # fixed: not part of the weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            F.pad(x, self.pad, mode="reflect"),
            self.filt.to(x.dtype),
            stride=self.stride,
            groups=self.channels,
        )


ATTN_LAYERS: dict[str, Callable[..., nn.Module]] = {"se": SqueezeExcite, "eca": EfficientChannelAttention}
AA_LAYERS: dict[str, Callable[..., nn.Module]] = {"avg": AvgPoolAA, "blur": BlurPool}
NORM_LAYERS: dict[str, Callable[[int], Callable[[int], nn.Module]]] = {  # ndim -> channels -> norm
    "batch": lambda ndim: _BN[ndim],
    "group": lambda ndim: group_norm,
    "frozen": lambda ndim: FrozenBatchNorm,
}


def plug_in(kind: str, registry: dict[str, Any], layer: str | Callable | None) -> Callable | None:
    """A layer type given by name (looked up in ``registry``) or as a callable."""
    if layer is None or callable(layer):
        return layer
    if layer not in registry:
        raise ReslabError(f"{kind}={layer!r}: choose one of {', '.join(registry)} or pass a callable")
    return registry[layer]
