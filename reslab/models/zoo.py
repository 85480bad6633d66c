"""The named architectures, as data. Each entry is a spec; no network code lives here."""

from __future__ import annotations

from reslab.models.registry import register_model
from reslab.models.spec import ResNetSpec

HE2015 = "He et al. 2015, Deep Residual Learning for Image Recognition"

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


_register_core()
