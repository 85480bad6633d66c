"""Parity with reference implementations: same weights -> same outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from reslab import create_model
from reslab.weights import load_weights

TORCHVISION = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
TORCHVISION_VIDEO = ["r3d_18", "mc3_18", "r2plus1d_18"]
TIMM = [
    "resnet26d",
    "resnet34d",
    "resnet50c",
    "resnet50d",
    "resnet50s",
    "resnet101d",
    "resnet152d",
    "seresnet50",
    "resnext50d_32x4d",
]


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Random BN statistics and affine weights, so that a mix-up of BN layers cannot go unnoticed."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
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


@pytest.mark.parametrize("name", TIMM)
def test_timm_parity_through_load_weights(name: str) -> None:
    """timm's state dicts load with reslab.load_weights and give timm's outputs (timm: test-only)."""
    timm = pytest.importorskip("timm")
    ref = _randomise_norms(timm.create_model(name))
    model = create_model(name).eval()
    report = load_weights(model, ref.state_dict())
    assert report.loaded == len(ref.state_dict())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


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
