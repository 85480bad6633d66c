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
WANG2020 = "Wang et al. 2020, ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks"
ZHANG2019 = "Zhang 2019, Making Convolutional Networks Shift-Invariant Again (anti-aliased downsampling)"
BELLO2021 = "Bello et al. 2021, Revisiting ResNets: Improved Training and Scaling Strategies (ResNet-RS)"
WU2018 = "Wu & He 2018, Group Normalization"
AFLALO2020 = "Aflalo et al. 2020, Knapsack Pruning with Inner Distillation (pruned ECA-ResNet-D)"

# Table 1 of the paper: depth -> (transform, blocks per stage).
IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
IMAGENET = dict(widths=(64, 128, 256, 512), stem="imagenet", stem_width=64)

# The depths of timm's ResNet family: the paper's and those its variants add.
TIMM_DEPTHS = {
    **IMAGENET_DEPTHS,
    10: ("basic", (1, 1, 1, 1)),
    14: ("bottleneck", (1, 1, 1, 1)),
    26: ("bottleneck", (2, 2, 2, 2)),
    200: ("bottleneck", (3, 24, 36, 3)),
    269: ("bottleneck", (3, 30, 48, 8)),
    "light": ("bottleneck", (1, 1, 11, 3)),  # ECA-ResNet-light
    "aa201": ("bottleneck", (3, 24, 36, 4)),  # SE-ResNeXt-AA-201
    # ResNet-RS (Bello et al. 2021, Table 9): depths of their own at 270 layers and beyond
    "rs200": ("bottleneck", (3, 24, 36, 3)),
    "rs270": ("bottleneck", (4, 29, 53, 4)),
    "rs350": ("bottleneck", (4, 36, 72, 4)),
    "rs420": ("bottleneck", (4, 44, 87, 4)),
}

# The letter after the depth in timm's names picks the stem and the shortcut (He et al. 2019):
# c: three 3x3 convs (32-32-64) instead of the 7x7; d: that stem and average-pool shortcuts;
# s: a wider deep stem (64-64-128); t: a tiered deep stem (24-32-64) and average-pool shortcuts.
# stem_width is the channels the stem hands to layer1.
VARIANTS = {
    "": dict(stem="imagenet", stem_width=64, shortcut="B"),
    "c": dict(stem="deep", stem_width=64, shortcut="B"),
    "d": dict(stem="deep", stem_width=64, shortcut="D"),
    "s": dict(stem="deep", stem_width=128, shortcut="B"),
    "t": dict(stem="deep_tiered", stem_width=64, shortcut="D"),
}
RS = dict(stem_pool="conv", attn_args=(("rd_ratio", 0.25),))  # a conv instead of the max-pool; SE at 1/4

# Knapsack-pruned ECA-ResNet-D: the output channels of each block's three convs, block by block,
# as in the published pruned weights (timm's ecaresnet50d_pruned and ecaresnet101d_pruned). The
# ECA kernels keep the sizes of the unpruned network (5 in stages 1-3, 7 in stage 4).
PRUNED_50D = (
    (47, 18, 19), (52, 22, 19), (64, 35, 19),
    (85, 37, 171), (107, 80, 171), (120, 85, 171), (125, 87, 171),
    (198, 126, 818), (255, 232, 818), (256, 233, 818), (253, 235, 818), (256, 225, 818), (256, 239, 818),
    (492, 237, 2022), (512, 500, 2022), (512, 490, 2022),
)  # fmt: skip
PRUNED_101D = (
    (45, 25, 26), (53, 20, 26), (60, 27, 26),
    (81, 24, 142), (93, 49, 142), (102, 54, 142), (122, 78, 142),
    (101, 25, 278), (239, 160, 278), (234, 156, 278), (250, 176, 278), (253, 191, 278), (251, 175, 278),
    (230, 128, 278), (244, 154, 278), (244, 159, 278), (238, 97, 278), (244, 149, 278), (253, 181, 278),
    (245, 119, 278), (255, 216, 278), (256, 201, 278), (253, 149, 278), (254, 141, 278), (256, 190, 278),
    (256, 217, 278), (255, 156, 278), (256, 155, 278), (256, 232, 278), (256, 214, 278),
    (499, 289, 2042), (512, 512, 2042), (512, 502, 2042),
)  # fmt: skip
PRUNED_ECA = (("kernel_size", (5, 5, 5, 7)),)

# timm's ResNet family beyond torchvision's: name -> (depth, variant, groups, width per group,
# attention, anti-aliasing[, other spec fields]).
TIMM_FAMILY = {
    "resnet10t": (10, "t", 1, 64, None, None),
    "resnet14t": (14, "t", 1, 64, None, None),
    "resnet18d": (18, "d", 1, 64, None, None),
    "resnet26": (26, "", 1, 64, None, None),
    "resnet26d": (26, "d", 1, 64, None, None),
    "resnet26t": (26, "t", 1, 64, None, None),
    "resnet34d": (34, "d", 1, 64, None, None),
    "resnet50c": (50, "c", 1, 64, None, None),
    "resnet50d": (50, "d", 1, 64, None, None),
    "resnet50s": (50, "s", 1, 64, None, None),
    "resnet50t": (50, "t", 1, 64, None, None),
    "resnet101c": (101, "c", 1, 64, None, None),
    "resnet101d": (101, "d", 1, 64, None, None),
    "resnet101s": (101, "s", 1, 64, None, None),
    "resnet152c": (152, "c", 1, 64, None, None),
    "resnet152d": (152, "d", 1, 64, None, None),
    "resnet152s": (152, "s", 1, 64, None, None),
    "resnet200": (200, "", 1, 64, None, None),
    "resnet200d": (200, "d", 1, 64, None, None),
    "resnet50_gn": (50, "", 1, 64, None, None, dict(norm="group")),
    "resnext50d_32x4d": (50, "d", 32, 4, None, None),
    "resnext101_32x4d": (101, "", 32, 4, None, None),
    "resnext101_32x16d": (101, "", 32, 16, None, None),
    "resnext101_32x32d": (101, "", 32, 32, None, None),
    "seresnet18": (18, "", 1, 64, "se", None),
    "seresnet34": (34, "", 1, 64, "se", None),
    "seresnet50": (50, "", 1, 64, "se", None),
    "seresnet50t": (50, "t", 1, 64, "se", None),
    "seresnet101": (101, "", 1, 64, "se", None),
    "seresnet152": (152, "", 1, 64, "se", None),
    "seresnet152d": (152, "d", 1, 64, "se", None),
    "seresnet200d": (200, "d", 1, 64, "se", None),
    "seresnet269d": (269, "d", 1, 64, "se", None),
    "seresnext26d_32x4d": (26, "d", 32, 4, "se", None),
    "seresnext26t_32x4d": (26, "t", 32, 4, "se", None),
    "seresnext50_32x4d": (50, "", 32, 4, "se", None),
    "seresnext101_32x4d": (101, "", 32, 4, "se", None),
    "seresnext101_32x8d": (101, "", 32, 8, "se", None),
    "seresnext101_64x4d": (101, "", 64, 4, "se", None),
    "seresnext101d_32x8d": (101, "d", 32, 8, "se", None),
    # SENet-154: the wide deep stem, a halved first conv in every block, 3x3 projection shortcuts
    "senet154": (152, "s", 64, 4, "se", None, dict(reduce_first=2, shortcut_kernel=3)),
    "ecaresnet26t": (26, "t", 1, 64, "eca", None),
    "ecaresnet50d": (50, "d", 1, 64, "eca", None),
    "ecaresnet50t": (50, "t", 1, 64, "eca", None),
    "ecaresnet101d": (101, "d", 1, 64, "eca", None),
    "ecaresnet200d": (200, "d", 1, 64, "eca", None),
    "ecaresnet269d": (269, "d", 1, 64, "eca", None),
    "ecaresnetlight": ("light", "", 1, 64, "eca", None, dict(shortcut="D")),
    "ecaresnext26t_32x4d": (26, "t", 32, 4, "eca", None),
    "ecaresnext50t_32x4d": (50, "t", 32, 4, "eca", None),
    "ecaresnet50d_pruned": (50, "d", 1, 64, "eca", None, dict(block_widths=PRUNED_50D, attn_args=PRUNED_ECA)),
    "ecaresnet101d_pruned": (
        101,
        "d",
        1,
        64,
        "eca",
        None,
        dict(block_widths=PRUNED_101D, attn_args=PRUNED_ECA),
    ),
    "resnetaa34d": (34, "d", 1, 64, None, "avg"),
    "resnetaa50": (50, "", 1, 64, None, "avg"),
    "resnetaa50d": (50, "d", 1, 64, None, "avg"),
    "resnetaa101d": (101, "d", 1, 64, None, "avg"),
    "seresnetaa50d": (50, "d", 1, 64, "se", "avg"),
    "seresnextaa101d_32x8d": (101, "d", 32, 8, "se", "avg"),
    "seresnextaa201d_32x8d": ("aa201", "d", 32, 8, "se", "avg", dict(stem_width=128)),
    "resnetblur18": (18, "", 1, 64, None, "blur"),
    "resnetblur50": (50, "", 1, 64, None, "blur"),
    "resnetblur50d": (50, "d", 1, 64, None, "blur"),
    "resnetblur101d": (101, "d", 1, 64, None, "blur"),
    "resnetrs50": (50, "d", 1, 64, "se", None, RS),
    "resnetrs101": (101, "d", 1, 64, "se", None, RS),
    "resnetrs152": (152, "d", 1, 64, "se", None, RS),
    "resnetrs200": ("rs200", "d", 1, 64, "se", None, RS),
    "resnetrs270": ("rs270", "d", 1, 64, "se", None, RS),
    "resnetrs350": ("rs350", "d", 1, 64, "se", None, RS),
    "resnetrs420": ("rs420", "d", 1, 64, "se", None, RS),
}


def _timm_family(name: str) -> tuple[str, str]:
    """The family (for listings) and the paper of a timm-family name."""
    for prefix, family, paper in (
        ("resnetrs", "ResNet-RS", BELLO2021),
        ("ecaresnet", "ECA-ResNet", AFLALO2020 if name.endswith("pruned") else WANG2020),
        ("resnetaa", "anti-aliased ResNet", ZHANG2019),
        ("seresnextaa", "anti-aliased ResNet", ZHANG2019),
        ("seresnetaa", "anti-aliased ResNet", ZHANG2019),
        ("resnetblur", "anti-aliased ResNet", ZHANG2019),
        ("se", "SE-ResNet/ResNeXt", HU2018),
        ("resnext", "ResNeXt", XIE2017),
        ("resnet50_gn", "GroupNorm ResNet", WU2018),
    ):
        if name.startswith(prefix):
            return family, paper
    return "ResNet-B/C/D/S/T", HE2019


# Sec. 4.2: 6n+2 layers, 16/32/64 filters on 32/16/8 maps, option-A shortcuts.
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
CIFAR = dict(
    block="basic", widths=(16, 32, 64), stem="cifar", stem_width=16, num_classes=10, input_size=(32, 32)
)


CIFAR_STYLE = dict(CIFAR, widths=IMAGENET["widths"], stem_width=64, shortcut="B")


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

    # CIFAR-style ImageNet-depth ResNets, the most common CIFAR baselines (the "kuangliu" layout):
    # a 3x3 stride-1 stem and no max-pool on 32x32 inputs, 64-128-256-512 widths, projection
    # shortcuts. Not in the paper (its CIFAR nets are the 6n+2 ones above).
    family = "ResNet (CIFAR-style, ImageNet depths)"
    for depth in (18, 34, 50, 101, 152):
        block, depths = IMAGENET_DEPTHS[depth]
        spec = ResNetSpec(**{**CIFAR_STYLE, "block": block, "depths": depths})
        register_model(f"resnet{depth}_cifar", spec, family=family, paper=HE2015)
    spec = ResNetSpec(**{**CIFAR_STYLE, "block": "basic", "depths": (2, 2, 2, 2)}, preact=True)
    register_model("preact_resnet18_cifar", spec, family=family, paper=HE2016)

    for name, entry in TIMM_FAMILY.items():
        depth, variant, groups, base_width, attn, aa, *extra = entry
        block, depths = TIMM_DEPTHS[depth]
        family, paper = _timm_family(name)
        fields = {**VARIANTS[variant], **(extra[0] if extra else {})}
        spec = ResNetSpec(
            block=block,
            depths=depths,
            widths=IMAGENET["widths"],
            groups=groups,
            base_width=base_width,
            attn=attn,
            aa=aa,
            **fields,
        )
        register_model(name, spec, family=family, paper=paper)

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
    if k < 1:
        raise ReslabError(f"WRN-{depth}-{k}: the widening factor k must be at least 1 (e.g. wrn{depth}_2)")
    n, rest = divmod(depth - 4, 6)
    if rest or n < 1:
        raise ReslabError(f"WRN-{depth}-{k}: Wide ResNets have 6n+4 layers (16, 22, 28, 40, ...)")
    return ResNetSpec(preact=True, **{**CIFAR, "widths": (16 * k, 32 * k, 64 * k), "depths": (n, n, n)})


_register_core()
_register_family()
