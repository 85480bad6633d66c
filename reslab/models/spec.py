"""The architecture of every reslab network, as data.

A :class:`ResNetSpec` says everything that defines a network's shape: which residual
transform each block applies, how many blocks each stage has, how wide they are, which
stem and shortcut the network uses, and whether it is pre-activation, grouped, 3D, ...
The one :class:`~reslab.models.resnet.ResNet` class turns a spec into modules.

Glossary (names in code -> symbols in the papers):

- ``depths``: blocks per stage (He et al. 2015, Table 1 "x n"; the CIFAR nets' ``n``).
- ``widths``: a stage's *planes*: the bottleneck's narrow width, or a basic block's width.
- ``expansion``: ``out_chs = planes * expansion`` (4 for bottlenecks, 1 for basic blocks).
- ``in_chs`` / ``mid_chs`` / ``out_chs``: a block's input, inner and output channels.
- ``groups``: ResNeXt's cardinality ``C``; ``base_width``: its ``d`` (width per group for
  64 planes), so ``mid_chs = planes * base_width / 64 * groups``.
- ``shortcut``: the paper's options A/B/C (Sec. 3.3), plus D (average-pool then project,
  "Bag of Tricks" ResNet-D) and ``"none"`` (the plain twin).
- ``stem``: ``imagenet`` (7x7, the paper's), ``cifar`` (one 3x3, Sec. 4.2), ``deep`` (three 3x3,
  ResNet-C), ``deep_tiered`` (three 3x3 of widening width, timm's "t"), and the video stems.
- ``attn`` / ``aa`` / ``norm``: the layer types plugged into every block (attention on the branch
  output, anti-aliased downsampling, normalisation), by registered name.
- ``block_widths``: explicit output channels of each conv of each block (pruned networks).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from reslab.errors import ReslabError
from reslab.models.layers import AA_LAYERS, ATTN_LAYERS, NORM_LAYERS

BLOCKS = ("basic", "bottleneck")  # the transforms, built by resnet.TRANSFORMS
EXPANSION = {"basic": 1, "bottleneck": 4}
CONVS_PER_BLOCK = {"basic": 2, "bottleneck": 3}
STEMS = ("imagenet", "cifar", "deep", "deep_tiered", "video", "video_2plus1d")
STEM_POOLS = ("max", "conv")
SHORTCUTS = ("A", "B", "C", "D", "none")
CONVS = ("standard", "2plus1d", "no_temporal")
LAYOUTS = ("flat", "grouped")


@dataclass(frozen=True)
class ResNetSpec:
    """One residual network architecture. Frozen: a spec is a value, not a configuration object."""

    block: str  # the residual transform: "basic" (two 3x3) or "bottleneck" (1x1-3x3-1x1)
    depths: tuple[int, ...]  # blocks per stage
    widths: tuple[int, ...]  # planes per stage
    stem: str = "imagenet"
    stem_width: int = 64  # channels the stem hands to the first stage
    stem_pool: str = "max"  # ImageNet stems' downsampling: a max-pool, or a strided 3x3 conv (ResNet-RS)
    shortcut: str = "B"
    shortcut_kernel: int = 1  # kernel of strided projections (SENet-154: 3)
    preact: bool = False  # BN-ReLU-conv order, identity path left clean (He et al. 2016)
    groups: int = 1
    base_width: int = 64
    reduce_first: int = 1  # the first conv of a block at 1/reduce_first width (SENet-154: 2)
    attn: str | None = None  # attention on the branch output: "se" (squeeze-excite), "eca"
    # keyword arguments of the attention layer; a tuple value gives one per stage
    attn_args: tuple[tuple[str, Any], ...] = ()
    aa: str | None = None  # anti-aliased downsampling in strided convs and the stem: "avg", "blur"
    norm: str = "batch"  # "batch", "group" (GroupNorm, 32 groups; fewer on narrow layers), "frozen"
    # explicit output channels of each conv of each block, in depth order (pruned networks); the
    # nominal widths above still name the architecture it was pruned from
    block_widths: tuple[tuple[int, ...], ...] | None = None
    ndim: int = 2  # 2 for images, 3 for video clips (the same wiring with 3D layers)
    conv: tuple[str, ...] = ("standard",)  # conv maker, one per stage or one for all
    layout: str = "flat"  # state-dict naming: torchvision's 2D (conv1, bn1) or video (conv1.0, conv1.1)
    dropout: float = 0.0  # between the convs of a block (Wide ResNets)
    num_classes: int = 1000
    input_size: tuple[int, ...] = (224, 224)  # default spatial (and temporal) size, for FLOPs and info

    def __post_init__(self) -> None:
        if len(self.conv) == 1 and len(self.depths) > 1:
            object.__setattr__(self, "conv", self.conv * len(self.depths))
        problems = []
        if self.block not in BLOCKS:
            problems.append(f"block={self.block!r} (choose from {', '.join(BLOCKS)})")
        if len(self.depths) != len(self.widths) or not self.depths:
            problems.append(f"depths {self.depths} and widths {self.widths} need one entry per stage")
        if any(d < 1 for d in self.depths):
            problems.append(f"depths {self.depths} must be positive")
        if self.stem not in STEMS:
            problems.append(f"stem={self.stem!r} (choose from {', '.join(STEMS)})")
        if self.stem_pool not in STEM_POOLS:
            problems.append(f"stem_pool={self.stem_pool!r} (choose from {', '.join(STEM_POOLS)})")
        if self.shortcut not in SHORTCUTS:
            problems.append(f"shortcut={self.shortcut!r} (choose from {', '.join(SHORTCUTS)})")
        if len(self.conv) != len(self.depths) or any(c not in CONVS for c in self.conv):
            problems.append(f"conv={self.conv} (one of {', '.join(CONVS)} per stage)")
        if self.attn is not None and self.attn not in ATTN_LAYERS:
            problems.append(f"attn={self.attn!r} (choose from {', '.join(ATTN_LAYERS)})")
        if self.aa is not None and (self.aa not in AA_LAYERS or self.ndim != 2):
            problems.append(f"aa={self.aa!r} (choose from {', '.join(AA_LAYERS)}; 2D networks only)")
        if self.norm not in NORM_LAYERS:
            problems.append(f"norm={self.norm!r} (choose from {', '.join(NORM_LAYERS)})")
        if self.stem_width < 1 or self.groups < 1 or self.base_width < 1 or self.reduce_first < 1:
            problems.append("stem_width, groups, base_width and reduce_first must be positive")
        if any(w < 1 for w in self.widths):
            problems.append(f"widths {self.widths} must be positive")
        problems += self._block_width_problems()
        if self.layout not in LAYOUTS:
            problems.append(f"layout={self.layout!r} (choose from {', '.join(LAYOUTS)})")
        if self.ndim not in (2, 3) or len(self.input_size) != self.ndim:
            problems.append(f"ndim={self.ndim} with input_size={self.input_size}")
        if self.block == "basic" and (self.groups != 1 or self.base_width != 64):
            problems.append("basic blocks have no groups/base_width (use block='bottleneck')")
        if self.preact and self.layout == "grouped":
            problems.append("pre-activation blocks use the flat layout")
        if problems:
            raise ReslabError("invalid ResNetSpec: " + "; ".join(problems))

    def _block_width_problems(self) -> list[str]:
        if self.block_widths is None:
            return []
        n = CONVS_PER_BLOCK.get(self.block, 0)
        if len(self.block_widths) != sum(self.depths) or any(len(b) != n for b in self.block_widths):
            return [f"block_widths: one tuple of {n} widths per block ({sum(self.depths)} blocks)"]
        start, problems = 0, []
        for s, depth in enumerate(self.depths):  # a stage's blocks add to one shortcut: one output width
            outs = {b[-1] for b in self.block_widths[start : start + depth]}
            if len(outs) > 1:
                problems.append(f"block_widths of stage {s + 1} end in different widths {sorted(outs)}")
            start += depth
        return problems

    @property
    def expansion(self) -> int:
        return EXPANSION[self.block]

    @property
    def residual(self) -> bool:
        return self.shortcut != "none"

    @property
    def num_layers(self) -> int:
        """Weighted layers as the papers count them: stem convs, branch convs and the classifier."""
        stem_convs = 3 if self.stem.startswith("deep") else 1
        return stem_convs + CONVS_PER_BLOCK[self.block] * sum(self.depths) + 1

    def attn_kwargs(self, stage: int) -> dict[str, Any]:
        """The attention layer's keyword arguments in ``stage`` (0-based)."""
        return {k: v[stage] if isinstance(v, tuple) else v for k, v in self.attn_args}

    def describe(self) -> str:
        """One line: the transform, stem, shortcut and the options that are set."""
        shortcut = {
            "none": "none (plain network)",
            "A": "A (zero-pad)",
            "B": "B (project on shape change)",
            "C": "C (project everywhere)",
            "D": "D (avg-pool + project)",
        }[self.shortcut]
        return (
            f"block {self.block}, stem {self.stem}"
            + (f" ({self.stem_pool} pool)" if self.stem_pool != "max" else "")
            + f", shortcut {shortcut}"
            + (", pre-activation" if self.preact else "")
            + (f", groups {self.groups}x{self.base_width}d" if self.groups > 1 else "")
            + (f", attention {self.attn}" if self.attn else "")
            + (f", anti-aliasing {self.aa}" if self.aa else "")
            + (f", {self.norm} norm" if self.norm != "batch" else "")
            + (", pruned widths" if self.block_widths else "")
        )

    def replace(self, **changes: Any) -> ResNetSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


SPEC_FIELDS = tuple(f.name for f in fields(ResNetSpec))
