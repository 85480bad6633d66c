"""The one residual network: a :class:`ResNetSpec` turned into modules.

The residual wiring, ``out = act(shortcut(x) + F(x))`` (or ``x + F(x)`` with pre-activation),
is written once, in :meth:`ResidualBlock.forward`. What varies is data: the transform ``F``
(basic or bottleneck: a list of :class:`ConvSpec`), the conv maker (2D, 3D, (2+1)D), the
shortcut kind (A/B/C/D, or none for plain nets), the stem and the layer types plugged in.

Attribute names are checkpoint API and follow torchvision (``conv1``, ``bn1``, ``layer1..4``,
``downsample``, ``fc``), so weights interchange with torchvision and timm.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.models.layers import (
    AA_LAYERS,
    ATTN_LAYERS,
    NORM_LAYERS,
    AALayer,
    ActLayer,
    AttnLayer,
    ConvMaker,
    ConvSpec,
    DropPath,
    NormLayer,
    default_act,
    make_shortcut,
    plug_in,
    shortcut_problem,
)
from reslab.models.spec import ResNetSpec


def basic_transform(
    in_chs: int,
    planes: int,
    stride: int,
    spec: ResNetSpec,
    dilation: tuple[int, int],
    widths: tuple[int, ...] | None = None,
) -> list[ConvSpec]:
    """Two 3x3 convs (the paper's Fig. 5 left); the first one strides. ``widths``: the two convs'
    output channels when they are not the spec's (pruned networks)."""
    first, rest = dilation
    c1, c2 = widths or (planes // spec.reduce_first, planes)
    return [
        ConvSpec(in_chs, c1, 3, stride, dilation=first, match_chs=(in_chs, planes)),
        ConvSpec(c1, c2, 3, 1, dilation=rest, match_chs=(in_chs, planes)),
    ]


def bottleneck_transform(
    in_chs: int,
    planes: int,
    stride: int,
    spec: ResNetSpec,
    dilation: tuple[int, int],
    widths: tuple[int, ...] | None = None,
) -> list[ConvSpec]:
    """1x1 reduce, 3x3, 1x1 expand (Fig. 5 right), grouped for ResNeXt.

    The stride sits on the 3x3 conv ("ResNet v1.5", as torchvision and timm), not on the first
    1x1 as in the paper: same parameters, about 0.5% better top-1. SENet-154 narrows the first
    conv by ``reduce_first``.
    """
    mid = int(planes * spec.base_width / 64) * spec.groups
    c1, c2, c3 = widths or (mid // spec.reduce_first, mid, planes * 4)
    return [
        ConvSpec(in_chs, c1, 1),
        ConvSpec(c1, c2, 3, stride, spec.groups, dilation[0], match_chs=(in_chs, planes)),
        ConvSpec(c2, c3, 1),
    ]


TRANSFORMS: dict[str, Callable[..., list[ConvSpec]]] = {
    "basic": basic_transform,
    "bottleneck": bottleneck_transform,
}


class ResidualBlock(nn.Module):
    """``act(shortcut(x) + F(x))``, or ``x + F(preact(x))``, or plain ``act(F(x))``.

    ``F`` is the chain of ``convs``: conv-norm-act (post-activation, He et al. 2015) or
    norm-act-conv (pre-activation, He et al. 2016), with optional dropout between convs (Wide
    ResNets), anti-aliased downsampling (the strided conv runs at stride 1 and ``aa_layer``
    downsamples after its activation), attention on its output (SE, ECA), and stochastic depth on
    the whole branch.
    """

    def __init__(
        self,
        convs: list[ConvSpec],
        *,
        shortcut: nn.Module | None,
        residual: bool = True,
        preact: bool = False,
        conv_layer: ConvMaker,
        norm_layer: NormLayer,
        act_layer: ActLayer,
        attn_layer: AttnLayer | None = None,
        aa_layer: AALayer | None = None,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        layout: str = "flat",
    ) -> None:
        super().__init__()
        self.residual, self.preact = residual, preact
        self.in_chs, self.out_chs = convs[0].in_chs, convs[-1].out_chs
        self.widths = tuple(c.out_chs for c in convs)  # the branch's conv output channels
        self.stride = max(c.stride for c in convs)
        self._units: list[tuple[str, str | None]] = []
        self._aa_after = -1  # the unit whose output is downsampled by anti-aliasing
        for i, c in enumerate(convs, 1):
            if aa_layer is not None and c.stride > 1:
                self._aa_after, self.aa = i - 1, aa_layer(c.out_chs, c.stride)
                c = replace(c, stride=1)
            conv = conv_layer(c)
            if layout == "grouped":  # torchvision's video layout: conv{i} = (conv, norm)
                self.add_module(f"conv{i}", nn.Sequential(conv, norm_layer(c.out_chs)))
                self._units.append((f"conv{i}", None))
            elif preact:
                self.add_module(f"bn{i}", norm_layer(c.in_chs))
                self.add_module(f"conv{i}", conv)
                self._units.append((f"conv{i}", f"bn{i}"))
            else:
                self.add_module(f"conv{i}", conv)
                self.add_module(f"bn{i}", norm_layer(c.out_chs))
                self._units.append((f"conv{i}", f"bn{i}"))
        out_chs = convs[-1].out_chs
        self.se = attn_layer(out_chs, ndim=conv_layer.ndim) if attn_layer else None
        self.downsample = shortcut
        self.act = act_layer()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, shortcut = x, x
        for i, (conv, norm) in enumerate(self._units):
            if i > 0:
                out = self.drop(out)
            if self.preact:
                out = self.act(getattr(self, norm)(out))
                if i == 0:  # a shortcut module sees the pre-activated input; identity sees x
                    shortcut = out if self.downsample is not None else x
                out = getattr(self, conv)(out)
            else:
                out = getattr(self, conv)(out)
                if norm is not None:
                    out = getattr(self, norm)(out)
                if i < len(self._units) - 1:
                    out = self.act(out)
            if i == self._aa_after:
                out = self.aa(out)
        if self.se is not None:
            out = self.se(out)
        if self.residual:
            if self.downsample is not None:
                shortcut = self.downsample(shortcut)
            out = self.drop_path(out) + shortcut
        return out if self.preact else self.act(out)

    @property
    def keeps_shape(self) -> bool:
        """Whether the block maps its input shape to itself, so that it can be replaced by identity."""
        return self.in_chs == self.out_chs and self.stride == 1

    def responses(self) -> list[tuple[str, nn.Module]]:
        """Where each 3x3 conv's response can be read, after its BN and before any ReLU or addition
        (the paper's Fig. 7): the BN that follows it, or in pre-activation blocks the conv itself."""
        found = []
        for conv_name, norm_name in self._units:
            first = next(
                m for m in getattr(self, conv_name).modules() if isinstance(m, nn.Conv2d | nn.Conv3d)
            )
            if max(first.kernel_size) == 1:
                continue
            name = norm_name if norm_name and not self.preact else conv_name
            found.append((name, getattr(self, name)))
        return found

    def zero_init_last(self) -> None:
        """Start the branch at zero so the block starts as identity (Goyal et al. 2017)."""
        conv, norm = self._units[-1]
        if self.preact:
            nn.init.zeros_(getattr(self, conv).weight)
        else:
            nn.init.zeros_((getattr(self, norm) if norm else getattr(self, conv)[-1]).weight)


def build_stem(
    spec: ResNetSpec,
    in_chans: int,
    norm_layer: NormLayer,
    act_layer: ActLayer,
    aa_layer: AALayer | None = None,
) -> tuple[OrderedDict[str, nn.Module], int]:
    """The stem's modules in order (names are checkpoint keys) and its spatial reduction.

    Pre-activation stems end with a conv: the first block normalises and activates its input.
    """
    w, post = spec.stem_width, not spec.preact
    m: OrderedDict[str, nn.Module] = OrderedDict()
    if spec.stem in ("imagenet", "deep", "deep_tiered"):
        if spec.stem == "imagenet":
            m["conv1"] = nn.Conv2d(in_chans, w, 7, 2, 3, bias=False)
        else:  # ResNet-C: three 3x3 convs instead of the 7x7 (He et al. 2019, "Bag of Tricks")
            h = w // 2
            first = 3 * (h // 4) if spec.stem == "deep_tiered" else h  # timm's "t": 24-32-64 for 64
            m["conv1"] = nn.Sequential(
                nn.Conv2d(in_chans, first, 3, 2, 1, bias=False),
                norm_layer(first),
                act_layer(),
                nn.Conv2d(first, h, 3, 1, 1, bias=False),
                norm_layer(h),
                act_layer(),
                nn.Conv2d(h, w, 3, 1, 1, bias=False),
            )
        if post:
            m["bn1"], m["act1"] = norm_layer(w), act_layer()
        m["maxpool"] = _stem_pool(spec.stem_pool, w, norm_layer, act_layer, aa_layer)
        return m, 4
    if spec.stem == "cifar":  # Sec. 4.2: one 3x3 conv, no pooling
        m["conv1"] = nn.Conv2d(in_chans, w, 3, 1, 1, bias=False)
        if post:
            m["bn1"], m["act1"] = norm_layer(w), act_layer()
        return m, 1
    if spec.stem == "video":  # torchvision's R3D/MC3 stem: 3x7x7, spatial stride 2, no pool
        m["stem"] = nn.Sequential(
            nn.Conv3d(in_chans, w, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False), norm_layer(w), act_layer()
        )
        return m, 2
    # R(2+1)D stem: 1x7x7 to 45 channels then 3x1x1, as torchvision and Tran et al. 2018
    m["stem"] = nn.Sequential(
        nn.Conv3d(in_chans, 45, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
        norm_layer(45),
        act_layer(),
        nn.Conv3d(45, w, (3, 1, 1), 1, (1, 0, 0), bias=False),
        norm_layer(w),
        act_layer(),
    )
    return m, 2


def _stem_pool(
    kind: str, w: int, norm_layer: NormLayer, act_layer: ActLayer, aa_layer: AALayer | None
) -> nn.Module:
    """The stem's last 2x downsampling: a 3x3 max-pool, or a strided 3x3 conv-norm-act (ResNet-RS,
    Bello et al. 2021). With anti-aliasing the stride moves into the anti-aliasing layer; a layer
    that is a pool itself (average pooling) replaces the max-pool. The module keeps the name
    ``maxpool`` whatever it is: checkpoint keys."""
    if kind == "conv":
        layers = [nn.Conv2d(w, w, 3, 1 if aa_layer else 2, 1, bias=False)]
        layers += [aa_layer(w, 2)] if aa_layer else []
        return nn.Sequential(*layers, norm_layer(w), act_layer())
    if aa_layer is None:
        return nn.MaxPool2d(3, 2, 1)
    if getattr(aa_layer, "replaces_pool", False):
        return aa_layer(w, 2)
    return nn.Sequential(nn.MaxPool2d(3, 1, 1), aa_layer(w, 2))


@dataclass(frozen=True)
class BlockLayers:
    """The layer types every block of a stage is built from."""

    conv: ConvMaker
    norm: NormLayer
    act: ActLayer
    attn: AttnLayer | None = None
    aa: AALayer | None = None


def make_stage(
    spec: ResNetSpec,
    s: int,
    in_chs: int,
    stride: int,
    dilation: tuple[int, int],
    reduction: int,
    first_block: int,
    drop_path_rate: float,
    layers: BlockLayers,
) -> nn.Sequential:
    """Stage ``s`` of ``spec``: its blocks, the first one striding (and changing width), each with
    the transform, shortcut and layer types the spec names. ``dilation``: (the previous stage's,
    this stage's); ``first_block``: the index of the stage's first block in the whole network
    (pruned widths and the stochastic-depth rate run over all blocks)."""
    total_blocks, planes = sum(spec.depths), spec.widths[s]
    blocks = []
    for b in range(spec.depths[s]):
        idx = first_block + b
        widths = spec.block_widths[idx] if spec.block_widths else None
        out_chs = widths[-1] if widths else planes * spec.expansion
        problem = shortcut_problem(spec.shortcut, in_chs, out_chs)
        if problem:
            size = "x".join(str(max(1, d // reduction)) for d in spec.input_size)
            raise ReslabError(
                f"layer{s + 1}.{b}: residual branch gives {out_chs}x{size} but the option-"
                f"{spec.shortcut} shortcut gives {in_chs}x{size} ({problem}); use a projection "
                "shortcut (shortcut='B' or 'C')"
            )
        block_stride = stride if b == 0 else 1
        dpr = drop_path_rate * idx / max(1, total_blocks - 1)  # linear decay (Huang et al.)
        convs = TRANSFORMS[spec.block](
            in_chs, planes, block_stride, spec, (dilation[0] if b == 0 else dilation[1], dilation[1]), widths
        )
        shortcut = make_shortcut(
            spec.shortcut,
            in_chs,
            out_chs,
            block_stride,
            layers.conv,
            preact=spec.preact,
            kernel=spec.shortcut_kernel,
        )
        blocks.append(
            ResidualBlock(
                convs,
                shortcut=shortcut,
                residual=spec.residual,
                preact=spec.preact,
                conv_layer=layers.conv,
                norm_layer=layers.norm,
                act_layer=layers.act,
                attn_layer=layers.attn,
                aa_layer=layers.aa,
                dropout=spec.dropout,
                drop_path=dpr if spec.residual else 0.0,
                layout=spec.layout,
            )
        )
        in_chs = out_chs
    return nn.Sequential(*blocks)


OUTPUT_STRIDES = (8, 16, 32)  # what dilation can keep (timm's and torchvision's segmentation backbones)


def _check_options(
    num_classes: int | None, in_chans: int, drop_rate: float, drop_path_rate: float, output_stride: int | None
) -> None:
    """Build options out of range fail here, naming the option, not later in a forward pass."""
    problems = []
    if num_classes is not None and num_classes < 0:
        problems.append(f"num_classes={num_classes} (0 for no classifier, or a positive number)")
    if in_chans < 1:
        problems.append(f"in_chans={in_chans} (1 or more)")
    for name, rate in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
        if not 0 <= rate < 1:
            problems.append(f"{name}={rate} (a probability in [0, 1))")
    if output_stride is not None and output_stride not in OUTPUT_STRIDES:
        problems.append(f"output_stride={output_stride} (one of {', '.join(map(str, OUTPUT_STRIDES))})")
    if problems:
        raise ReslabError("model option out of range: " + "; ".join(problems))


class ResNet(nn.Module):
    """Every reslab network. Build one from a registered name with :func:`reslab.create_model`.

    Interface (as timm's): ``forward_features`` (the last feature map), ``forward_head``
    (pool, dropout, classifier; ``pre_logits=True`` stops before the classifier),
    ``reset_classifier``, ``feature_info`` (stem and each stage: channels, reduction, module),
    and ``features_only`` to return the feature maps of ``out_indices`` instead of logits.
    """

    def __init__(
        self,
        spec: ResNetSpec,
        *,
        num_classes: int | None = None,
        in_chans: int = 3,
        zero_init_residual: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        output_stride: int | None = None,
        norm_layer: str | NormLayer | None = None,
        act_layer: ActLayer | None = None,
        attn_layer: str | AttnLayer | None = None,
        aa_layer: str | AALayer | None = None,
        features_only: bool = False,
        out_indices: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        _check_options(num_classes, in_chans, drop_rate, drop_path_rate, output_stride)
        self.spec = spec
        self.num_classes = spec.num_classes if num_classes is None else num_classes
        self.in_chans = in_chans
        # Layer types: the spec's by default; a name or a callable plugs in another.
        norm_layer = plug_in("norm_layer", NORM_LAYERS, norm_layer or spec.norm)
        if norm_layer in NORM_LAYERS.values():
            norm_layer = norm_layer(spec.ndim)
        act_layer = act_layer or default_act
        if aa_layer is not None and spec.ndim != 2:
            raise ReslabError(
                f"aa_layer: anti-aliased downsampling is 2D only; {spec.ndim}D models take none"
            )
        aa_layer = plug_in("aa_layer", AA_LAYERS, aa_layer or spec.aa)
        spec_attn = attn_layer is None or attn_layer == spec.attn  # the spec's layer, with its arguments
        attn_layer = plug_in("attn_layer", ATTN_LAYERS, attn_layer or spec.attn)

        stem, reduction = build_stem(spec, in_chans, norm_layer, act_layer, aa_layer)
        for name, module in stem.items():
            self.add_module(name, module)
        self.stem_names = list(stem)
        # The stem's feature level is taken before its max-pool, as timm and torchvision's FPNs do.
        pooled = "maxpool" in stem
        stem_feature = [n for n in self.stem_names if n != "maxpool"][-1]
        self.feature_info = [
            dict(
                num_chs=spec.stem_width,
                reduction=reduction // 2 if pooled else reduction,
                module=stem_feature,
            )
        ]

        in_chs, dilation, first_block = spec.stem_width, 1, 0
        self.stage_names = []
        for s in range(len(spec.depths)):
            stride, prev_dilation = (1 if s == 0 else 2), dilation
            if output_stride is not None and reduction * stride > output_stride:
                dilation, stride = dilation * stride, 1  # keep resolution, grow the receptive field
            reduction *= stride
            stage_attn = (
                partial(attn_layer, **spec.attn_kwargs(s)) if attn_layer and spec_attn else attn_layer
            )
            layers = BlockLayers(
                ConvMaker(spec.conv[s], spec.ndim, norm_layer, act_layer),
                norm_layer,
                act_layer,
                stage_attn,
                aa_layer,
            )
            stage = make_stage(
                spec, s, in_chs, stride, (prev_dilation, dilation), reduction, first_block,
                drop_path_rate, layers,
            )  # fmt: skip
            in_chs, first_block = stage[-1].out_chs, first_block + spec.depths[s]
            self.stage_names.append(f"layer{s + 1}")
            self.add_module(f"layer{s + 1}", stage)
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"layer{s + 1}"))

        self.num_features = in_chs
        # Pre-activation nets end with BN-ReLU: their last block adds without activating.
        self.norm = norm_layer(in_chs) if spec.preact else None
        self.act = act_layer() if spec.preact else None
        self.avgpool = (nn.AdaptiveAvgPool2d if spec.ndim == 2 else nn.AdaptiveAvgPool3d)(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc: nn.Module = nn.Identity()
        self.reset_classifier(self.num_classes)
        self._init_weights(zero_init_residual)

        self.features_only = features_only
        n_feats = len(self.feature_info)
        self.out_indices = tuple(range(n_feats)) if out_indices is None else tuple(out_indices)
        if features_only:
            bad = [i for i in self.out_indices if not -n_feats <= i < n_feats]
            if bad:
                raise ReslabError(
                    f"out_indices {bad} out of range: this model has feature levels 0..{n_feats - 1}"
                )
            self.out_indices = tuple(i % n_feats for i in self.out_indices)
            self.reset_classifier(0)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # He et al. 2015b
            elif isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual and self.spec.residual:  # a plain block zeroed would output nothing
            for block in self.blocks():
                block.zero_init_last()

    def blocks(self) -> list[ResidualBlock]:
        """All residual blocks in depth order."""
        return [b for name in self.stage_names for b in getattr(self, name)]

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, name) for name in self.stage_names]

    def parts(self) -> list[tuple[str, list[nn.Module]]]:
        """The network from input to output in named parts: ``stem``, each stage, ``head`` (the final
        norm and the classifier). Freezing and fine-tuning act on these."""
        tail = [m for m in (self.norm, self.fc) if m is not None]
        return (
            [("stem", [getattr(self, s) for s in self.stem_names])]
            + [(s, [getattr(self, s)]) for s in self.stage_names]
            + [("head", tail)]
        )

    def set_trainable(self, first: int) -> list[str]:
        """Train the parts from index ``first`` of :meth:`parts` on and freeze those before it
        (``requires_grad``); returns the names of the trainable parts."""
        trainable = []
        for i, (name, modules) in enumerate(self.parts()):
            for module in modules:
                module.requires_grad_(i >= first)
            if i >= first:
                trainable.append(name)
        return trainable

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh classifier for ``num_classes`` (0: none, the model returns pooled features)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(x)) if self.norm is not None else x

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature map after the stem and after every stage (the last one as forward_features)."""
        feats = []
        for name in self.stem_names:
            if name == "maxpool":
                feats.append(x)
            x = getattr(self, name)(x)
        if "maxpool" not in self.stem_names:
            feats.append(x)
        for stage in self.stages():
            x = stage(x)
            feats.append(x)
        feats[-1] = self._final(feats[-1])
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stem_names:
            x = getattr(self, name)(x)
        for stage in self.stages():
            x = stage(x)
        return self._final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(torch.flatten(self.avgpool(x), 1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            feats = self.forward_intermediates(x)
            return [feats[i] for i in self.out_indices]
        return self.forward_head(self.forward_features(x))
