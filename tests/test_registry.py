"""The registry's contract and the architecture options: shortcuts, plain twins, init, strides."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from reslab import ReslabError, ResNetSpec, create_model, list_models
from reslab.complexity import count_params
from reslab.models import ResNet, register_model
from reslab.models.layers import DropPath, PadShortcut


def test_list_models_pattern() -> None:
    # natural order: numbers compare as numbers (resnet10t before resnet18, resnet20 before resnet101)
    assert list_models("resnet*")[:6] == [
        "resnet10t",
        "resnet14t",
        "resnet18",
        "resnet18_cifar",
        "resnet18d",
        "resnet20",
    ]
    assert list_models("resnet1*")[-3:] == ["resnet152d", "resnet152s", "resnet1202"]
    assert set(list_models("plain*")) == {f"plain{d}" for d in (18, 20, 32, 34, 44, 56, 110)}
    assert list_models("nothing*") == []


def test_unknown_name_suggests() -> None:
    with pytest.raises(ReslabError, match=r"unknown model 'resnet5'.*did you mean.*resnet50"):
        create_model("resnet5")


def test_duplicate_registration_raises() -> None:
    spec = ResNetSpec(
        block="basic", depths=(1,), widths=(8,), stem="cifar", stem_width=8, input_size=(32, 32)
    )
    with pytest.raises(ReslabError, match="already registered"):
        register_model("resnet18", spec, family="x", paper="y")


def test_contradicting_override_raises_and_agreeing_one_passes() -> None:
    with pytest.raises(ReslabError, match=r"depths=\(2, 2, 2, 2\) contradicts resnet50"):
        create_model("resnet50", depths=(2, 2, 2, 2))
    assert create_model("resnet50", depths=[3, 4, 6, 3], block="bottleneck").spec.depths == (3, 4, 6, 3)
    with pytest.raises(ReslabError, match="plain network"):
        create_model("plain20", shortcut="A")
    with pytest.raises(ReslabError, match="unknown option 'bogus'"):
        create_model("resnet20", bogus=1)


def _downsamples(model: ResNet) -> list[nn.Module | None]:
    return [b.downsample for b in model.blocks()]


def test_shortcut_options_on_resnet34() -> None:
    a, b, c = (create_model("resnet34", shortcut=s) for s in "ABC")
    assert all(d is None or isinstance(d, PadShortcut) for d in _downsamples(a))
    assert sum(isinstance(d, PadShortcut) for d in _downsamples(a)) == 3
    assert sum(d is not None for d in _downsamples(b)) == 3  # only where the shape changes
    assert all(isinstance(d, nn.Sequential) for d in _downsamples(c))  # projections everywhere
    pa, pb, pc = map(count_params, (a, b, c))
    assert pa < pb < pc  # the paper's Table 3 ordering of parameters (A is parameter-free)
    x = torch.randn(1, 3, 64, 64)
    for m in (a, b, c):
        assert m(x).shape == (1, 1000)


def test_plain_twins_have_no_shortcuts() -> None:
    for name in list_models("plain*"):
        model = create_model(name)
        assert not model.spec.residual
        assert all(d is None for d in _downsamples(model)), name
    # Option A shortcuts are parameter-free, so CIFAR twins have identical parameter counts.
    assert count_params(create_model("plain56")) == count_params(create_model("resnet56"))
    assert count_params(create_model("plain18")) < count_params(create_model("resnet18"))


def test_plain_block_really_has_no_identity_path() -> None:
    torch.manual_seed(0)
    plain, res = create_model("plain20"), create_model("resnet20")
    res.load_state_dict(plain.state_dict())
    for block in (plain.layer1[0], res.layer1[0]):
        for p in block.parameters():
            nn.init.zeros_(p)
    x = torch.randn(2, 16, 8, 8).abs()
    assert plain.layer1[0](x).abs().max() == 0  # branch zero -> output zero
    torch.testing.assert_close(res.layer1[0](x), x)  # branch zero -> identity


def test_shape_mismatch_names_block_shapes_and_fix() -> None:
    spec = ResNetSpec(
        block="basic",
        depths=(1, 1),
        widths=(32, 16),
        stem="cifar",
        stem_width=32,
        shortcut="A",
        num_classes=10,
        input_size=(32, 32),
    )
    with pytest.raises(ReslabError) as err:
        ResNet(spec)
    msg = str(err.value)
    assert "layer2.0" in msg and "16x16x16" in msg and "32x16x16" in msg and "projection" in msg
    ResNet(spec.replace(shortcut="B"))  # a projection fixes it


def test_zero_init_residual_makes_blocks_identity() -> None:
    model = create_model("resnet50", zero_init_residual=True).eval()
    block = model.layer1[1]  # identity shortcut
    assert all(b.bn3.weight.abs().sum() == 0 for b in model.blocks())
    x = torch.randn(1, 256, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu(x))
    plain = create_model("plain20", zero_init_residual=True)  # no residual: nothing to zero
    assert all(b.bn2.weight.abs().sum() > 0 for b in plain.blocks())


def test_in_chans_and_num_classes() -> None:
    model = create_model("resnet18", in_chans=1, num_classes=5)
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    assert create_model("resnet20").num_classes == 10
    assert create_model("resnet50").num_classes == 1000


def test_drop_path_decays_linearly() -> None:
    model = create_model("resnet50", drop_path_rate=0.2)
    rates = [b.drop_path.p if isinstance(b.drop_path, DropPath) else 0.0 for b in model.blocks()]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert all(b > a for a, b in itertools.pairwise(rates))
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # inactive at test time


@pytest.mark.parametrize(
    ("stride", "reductions"), [(32, [2, 4, 8, 16, 32]), (16, [2, 4, 8, 16, 16]), (8, [2, 4, 8, 8, 8])]
)
def test_output_stride_by_dilation(stride: int, reductions: list[int]) -> None:
    model = create_model("resnet50", features_only=True, output_stride=stride).eval()
    assert [f["reduction"] for f in model.feature_info] == reductions
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [64 // f.shape[-1] for f in feats] == reductions


def test_invalid_spec_is_explained() -> None:
    with pytest.raises(ReslabError, match="block='dense'"):
        ResNetSpec(block="dense", depths=(1,), widths=(8,))
    with pytest.raises(ReslabError, match="out_indices"):
        create_model("resnet18", features_only=True, out_indices=(7,))
