"""The named architectures, as data. Each entry is a spec; no network code lives here."""

from __future__ import annotations

from reslab.errors import ReslabError
from reslab.models.registry import ModelEntry, register_model, register_pattern
from reslab.models.spec import ResNetSpec

HE2015 = "He et al. 2015, Deep Residual Learning for Image Recognition"
HE2016 = "He et al. 2016, Identity Mappings in Deep Residual Networks"
XIE2017 = "Xie et al. 2017, Aggregated Residual Transformations (ResNeXt)"
WRN2016 = "Zagoruyko & Komodakis 2016, Wide Residual Networks"
HE2019 = "He et al. 2019, Bag of Tricks for Image Classification (ResNet-C/D); timm's variants"
HU2018 = "Hu et al. 2018, Squeeze-and-Excitation Networks"
TRAN2018 = "Tran et al. 2018, A Closer Look at Spatiotemporal Convolutions (R3D, MC3, R(2+1)D)"

# Table 1 of the paper: depth -> (transform, blocks per stage).
IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
IMAGENET = dict(widths=(64, 128, 256, 512), stem="imagenet", stem_width=64)

# Sec. 4.2: 6n+2 layers, 16/32/64 filters on 32/16/8 maps, option-A shortcuts.
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
CIFAR = dict(
    block="basic", widths=(16, 32, 64), stem="cifar", stem_width=16, num_classes=10, input_size=(32, 32)
)


def cifar_depths(depth: int) -> tuple[int, int, int]:
    n, rest = divmod(depth - 2, 6)
    if rest:
        raise ValueError(f"CIFAR ResNets have 6n+2 layers, not {depth}")
    return (n, n, n)


def _register_core() -> None:
    for depth, (block, depths) in IMAGENET_DEPTHS.items():
        spec = ResNetSpec(block=block, depths=depths, shortcut="B", **IMAGENET)
        register_model(f"resnet{depth}", spec, family="ResNet (ImageNet)", paper=HE2015)
    for depth in CIFAR_DEPTHS:
        spec = ResNetSpec(depths=cifar_depths(depth), shortcut="A", **CIFAR)
        register_model(f"resnet{depth}", spec, family="ResNet (CIFAR)", paper=HE2015)
    # The plain twins of Fig. 3/4/6: the same networks, shortcuts removed.
    for depth in (18, 34):
        block, depths = IMAGENET_DEPTHS[depth]
        spec = ResNetSpec(block=block, depths=depths, shortcut="none", **IMAGENET)
        register_model(f"plain{depth}", spec, family="plain (ImageNet)", paper=HE2015)
    for depth in (20, 32, 44, 56, 110):
        spec = ResNetSpec(depths=cifar_depths(depth), shortcut="none", **CIFAR)
        register_model(f"plain{depth}", spec, family="plain (CIFAR)", paper=HE2015)


def _register_family() -> None:
    # ResNeXt (cardinality x width per group) and wide ImageNet ResNets: torchvision's definitions.
    for name, depth, groups, width in (
        ("resnext50_32x4d", 50, 32, 4),
        ("resnext101_32x8d", 101, 32, 8),
        ("resnext101_64x4d", 101, 64, 4),
        ("wide_resnet50_2", 50, 1, 128),
        ("wide_resnet101_2", 101, 1, 128),
    ):
        _, depths = IMAGENET_DEPTHS[depth]
        spec = ResNetSpec(block="bottleneck", depths=depths, groups=groups, base_width=width, **IMAGENET)
        register_model(
            name,
            spec,
            family="ResNeXt" if groups > 1 else "Wide ResNet (ImageNet)",
            paper=XIE2017 if groups > 1 else WRN2016,
        )

    # Pre-activation ResNets: BN-ReLU-conv, identity path left clean, projections where shapes change.
    for depth, (block, depths) in IMAGENET_DEPTHS.items():
        spec = ResNetSpec(block=block, depths=depths, preact=True, **IMAGENET)
        register_model(f"preact_resnet{depth}", spec, family="pre-activation (ImageNet)", paper=HE2016)
    for depth, block in ((110, "basic"), (164, "bottleneck"), (1001, "bottleneck")):
        n = (depth - 2) // (6 if block == "basic" else 9)
        spec = ResNetSpec(preact=True, **{**CIFAR, "block": block, "depths": (n, n, n)})
        register_model(f"preact_resnet{depth}", spec, family="pre-activation (CIFAR)", paper=HE2016)

    # timm's ResNet-C (deep 3x3 stem), -D (deep stem + average-pool shortcut), -S (wide deep stem)
    # and SE-ResNet; stem_width is the channels the stem hands to layer1.
    tricks = {
        "resnet26d": ("bottleneck", (2, 2, 2, 2), 64, "D", 1, None),
        "resnet34d": ("basic", (3, 4, 6, 3), 64, "D", 1, None),
        "resnet50c": ("bottleneck", (3, 4, 6, 3), 64, "B", 1, None),
        "resnet50d": ("bottleneck", (3, 4, 6, 3), 64, "D", 1, None),
        "resnet50s": ("bottleneck", (3, 4, 6, 3), 128, "B", 1, None),
        "resnet101d": ("bottleneck", (3, 4, 23, 3), 64, "D", 1, None),
        "resnet152d": ("bottleneck", (3, 8, 36, 3), 64, "D", 1, None),
        "resnext50d_32x4d": ("bottleneck", (3, 4, 6, 3), 64, "D", 32, None),
    }
    for name, (block, depths, stem_width, shortcut, groups, attn) in tricks.items():
        spec = ResNetSpec(
            block=block,
            depths=depths,
            widths=IMAGENET["widths"],
            stem="deep",
            stem_width=stem_width,
            shortcut=shortcut,
            groups=groups,
            base_width=4 if groups > 1 else 64,
            attn=attn,
        )
        register_model(name, spec, family="ResNet-C/D/S", paper=HE2019)
    for depth in (18, 34, 50, 101, 152):
        block, depths = IMAGENET_DEPTHS[depth]
        spec = ResNetSpec(block=block, depths=depths, attn="se", **IMAGENET)
        register_model(f"seresnet{depth}", spec, family="SE-ResNet", paper=HU2018)

    # 3D ResNets for video clips: the same wiring with 3D, frame-wise or (2+1)D convs.
    video = dict(
        ndim=3,
        layout="grouped",
        stem="video",
        num_classes=400,
        input_size=(16, 112, 112),
        widths=IMAGENET["widths"],
        stem_width=64,
    )
    register_model(
        "r3d_18", ResNetSpec(block="basic", depths=(2, 2, 2, 2), **video), family="video", paper=TRAN2018
    )
    register_model(
        "mc3_18",
        ResNetSpec(block="basic", depths=(2, 2, 2, 2), conv=("standard",) + ("no_temporal",) * 3, **video),
        family="video",
        paper=TRAN2018,
    )
    register_model(
        "r2plus1d_18",
        ResNetSpec(
            block="basic", depths=(2, 2, 2, 2), conv=("2plus1d",), **{**video, "stem": "video_2plus1d"}
        ),
        family="video",
        paper=TRAN2018,
    )
    for depth in (34, 50):
        block, depths = IMAGENET_DEPTHS[depth]
        register_model(
            f"r3d_{depth}", ResNetSpec(block=block, depths=depths, **video), family="video", paper=TRAN2018
        )

    # CIFAR Wide ResNets, WRN-d-k: pre-activation basic blocks, widths 16k/32k/64k, (d-4)/6 blocks
    # per stage. Any wrn{d}_{k} is built on demand; the common ones are listed.
    for depth, k in ((16, 4), (16, 8), (22, 8), (28, 10), (40, 4)):
        register_model(
            f"wrn{depth}_{k}", wide_resnet_spec(depth, k), family="Wide ResNet (CIFAR)", paper=WRN2016
        )
    register_pattern(
        r"wrn(\d+)_(\d+)",
        lambda m: ModelEntry(
            m.group(0), wide_resnet_spec(int(m.group(1)), int(m.group(2))), "Wide ResNet (CIFAR)", WRN2016
        ),
    )


def wide_resnet_spec(depth: int, k: int) -> ResNetSpec:
    n, rest = divmod(depth - 4, 6)
    if rest or n < 1:
        raise ReslabError(f"WRN-{depth}-{k}: Wide ResNets have 6n+4 layers (16, 22, 28, 40, ...)")
    return ResNetSpec(preact=True, **{**CIFAR, "widths": (16 * k, 32 * k, 64 * k), "depths": (n, n, n)})


_register_core()
_register_family()
