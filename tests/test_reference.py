"""Parity with reference implementations: same weights -> same outputs."""

from __future__ import annotations

import pytest
import timm  # a test dependency (the dev extras): the reference of the ResNet family
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from reslab import create_model, list_models
from reslab.weights import load_weights

TORCHVISION = [n for n in list_models() if n in torchvision.models.list_models(module=torchvision.models)]
TORCHVISION_VIDEO = [
    n for n in list_models() if n in torchvision.models.list_models(module=torchvision.models.video)
]
# Every architecture of timm's ResNet module, from timm's own registry: a new one shows up here as
# a failing test until reslab registers it. timm's test_resnet is a unit-test toy mixing block types.
TIMM = sorted(timm.list_models(module="resnet"))
TIMM_SKIP = {"test_resnet": "timm's own test toy: a different block type per stage"}
# The largest (hundreds of MB of weights each): still run by `make test`, deselect with -m "not slow".
TIMM_SLOW = {"resnext101_32x16d", "resnext101_32x32d", "resnetrs270", "resnetrs350", "resnetrs420",
             "seresnextaa201d_32x8d", "senet154", "ecaresnet269d", "seresnet269d", "wide_resnet101_2"}  # fmt: skip


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Random norm statistics and affine weights, so that a mix-up of norm layers cannot go unnoticed."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm):
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


def _check_parity(name: str, ref: nn.Module, x: torch.Tensor) -> None:
    ref = _randomise_norms(ref)
    model = create_model(name).eval()
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [
        (k, v.shape) for k, v in ref.state_dict().items()
    ]
    model.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_parity(name: str) -> None:
    _check_parity(name, getattr(torchvision.models, name)(), torch.randn(2, 3, 96, 96))


@pytest.mark.parametrize("name", TORCHVISION_VIDEO)
def test_torchvision_video_parity(name: str) -> None:
    _check_parity(name, getattr(torchvision.models.video, name)(), torch.randn(2, 3, 8, 48, 48))


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in TIMM_SLOW else n for n in TIMM]
)
def test_timm_parity_through_load_weights(name: str) -> None:
    """timm's state dicts load into the reslab model of the same name with reslab.load_weights
    (same keys, same shapes, in the same order) and give timm's outputs (timm: test-only)."""
    if name in TIMM_SKIP:
        pytest.skip(TIMM_SKIP[name])
    ref = _randomise_norms(timm.create_model(name))
    model = create_model(name).eval()
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(k, tuple(v.shape)) for k, v in ref.state_dict().items()]
    assert load_weights(model, ref.state_dict()).loaded == len(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


class _OptionABlock(nn.Module):
    """The convention of the common PyTorch CIFAR ResNet reproductions, written out independently:
    a lambda shortcut that subsamples and pads planes//4 channels on each side."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = stride != 1 or in_planes != planes
        self.planes = planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        p = self.planes // 4
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p)) if self.pad else x
        return F.relu(out + short)


class _ReferenceCifarResNet(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_OptionABlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.avg_pool2d(out, out.shape[3]).flatten(1))


@pytest.mark.parametrize(("name", "n"), [("resnet20", 3), ("resnet32", 5)])
def test_cifar_option_a_checkpoint_parity(tmp_path, name: str, n: int) -> None:
    """A DataParallel checkpoint from a CIFAR reproduction ({'state_dict': {'module.…'}}, head
    'linear', '.th' file) loads strictly and gives the same outputs."""
    torch.manual_seed(1)
    ref = _ReferenceCifarResNet(n)
    for m in ref.modules():  # trained-looking BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    ref.eval()
    path = tmp_path / f"{name}.th"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}, "best_prec1": 91.7}, path
    )
    model = create_model(name).eval()
    report = load_weights(model, path)
    assert report.loaded == len(ref.state_dict()) and not report.missing
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


class _KuangliuBlock(nn.Module):
    """The CIFAR ResNet-18/50 blocks of the widely used "kuangliu" training script, written out
    independently: a projection `shortcut` (1x1 conv + BN) where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        out = planes * (4 if bottleneck else 1)
        mid = (planes, planes) if bottleneck else (planes,)
        chans = (in_planes, *mid, out)
        kernels = (1, 3, 1) if bottleneck else (3, 3)
        strides = (1, stride, 1) if bottleneck else (stride, 1)
        for i, (k, s) in enumerate(zip(kernels, strides, strict=True), 1):
            setattr(self, f"conv{i}", nn.Conv2d(chans[i - 1], chans[i], k, s, k // 2, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(chans[i]))
        self.n = len(kernels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i in range(1, self.n + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            out = F.relu(out) if i < self.n else out
        return F.relu(out + self.shortcut(x))


class _KuangliuResNet(nn.Module):
    def __init__(self, depths: tuple[int, ...], bottleneck: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for s, (planes, n) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
            blocks = []
            for i in range(n):
                blocks.append(
                    _KuangliuBlock(in_planes, planes, (1 if s == 0 else 2) if i == 0 else 1, bottleneck)
                )
                in_planes = planes * (4 if bottleneck else 1)
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(in_planes, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for s in range(1, 5):
            out = getattr(self, f"layer{s}")(out)
        return self.linear(F.avg_pool2d(out, 4).flatten(1))


@pytest.mark.parametrize(
    ("name", "depths", "bottleneck"),
    [("resnet18_cifar", (2, 2, 2, 2), False), ("resnet50_cifar", (3, 4, 6, 3), True)],
)
def test_cifar_style_imagenet_depths_take_kuangliu_checkpoints(name, depths, bottleneck) -> None:
    """The CIFAR ResNet-18/50 of the common training scripts (3x3 stem, no max-pool, `shortcut` and
    `linear` names) load into reslab's *_cifar models strictly and give the same outputs."""
    ref = _randomise_norms(_KuangliuResNet(depths, bottleneck))
    model = create_model(name).eval()
    assert load_weights(model, ref.state_dict()).loaded == len(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
