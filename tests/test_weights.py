"""load_weights: round trips, foreign layouts, and clear errors on bad files."""

from __future__ import annotations

import pytest
import torch
import torchvision

from reslab import ReslabError, create_model
from reslab.weights import load_weights, save_weights


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, shape=(2, 3, 32, 32)) -> None:
    x = torch.randn(shape)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def _trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.weight.uniform_(0.5, 1.0)
    return model


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip(tmp_path, suffix: str) -> None:
    src = _trained_looking(create_model("resnet20"))
    path = save_weights(src, tmp_path / f"w{suffix}")
    dst = create_model("resnet20")
    report = load_weights(dst, path)
    assert report.loaded == len(src.state_dict())
    _same_outputs(src, dst)


def test_torchvision_state_dict_file(tmp_path) -> None:
    ref = _trained_looking(torchvision.models.resnet18())
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    model = create_model("resnet18")
    load_weights(model, tmp_path / "tv.pth")
    _same_outputs(ref, model, (1, 3, 64, 64))


def test_timm_state_dict() -> None:
    timm = pytest.importorskip("timm")
    ref = _trained_looking(timm.create_model("resnet50"))
    model = create_model("resnet50")
    load_weights(model, ref.state_dict())
    _same_outputs(ref, model, (1, 3, 64, 64))


def test_wrapped_checkpoints() -> None:
    src = _trained_looking(create_model("resnet20"))
    sd = src.state_dict()
    for wrapped in (
        {"model": sd, "epoch": 3},
        {"state_dict": {f"module.{k}": v for k, v in sd.items()}},  # DataParallel
        {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 1},  # Lightning
        {f"_orig_mod.{k}": v for k, v in sd.items()},  # torch.compile
    ):
        dst = create_model("resnet20")
        load_weights(dst, wrapped)
        _same_outputs(src, dst)


def test_head_mismatch_is_explained_and_skippable() -> None:
    src = create_model("resnet18")  # 1000 classes
    dst = create_model("resnet18", num_classes=10)
    with pytest.raises(
        ReslabError, match=r"only the classifier differs \(checkpoint 1000 classes, model 10\)"
    ):
        load_weights(dst, src.state_dict())
    fc_before = dst.fc.weight.clone()
    for kwargs in ({"ignore_head": True}, {"strict": False}):
        report = load_weights(dst, src.state_dict(), **kwargs)
        assert report.head_skipped and not report.missing
        assert torch.equal(dst.conv1.weight, src.conv1.weight)
        assert torch.equal(dst.fc.weight, fc_before)


def test_other_mismatch_is_listed() -> None:
    with pytest.raises(ReslabError, match=r"does not fit model resnet34.*missing"):
        load_weights(create_model("resnet34"), create_model("resnet18").state_dict())
    report = load_weights(create_model("resnet34"), create_model("resnet18").state_dict(), strict=False)
    # resnet18's 2+2+2+2 blocks fill resnet34's first blocks of each stage; the rest is missing
    assert "layer1.2.conv1.weight" in report.missing and "layer1.1.conv1.weight" not in report.missing
    assert report.loaded == len(create_model("resnet18").state_dict()) and not report.mismatched


def test_headless_models_take_full_checkpoints() -> None:
    src = create_model("resnet18")
    for dst in (create_model("resnet18", num_classes=0), create_model("resnet18", features_only=True)):
        report = load_weights(dst, src.state_dict())
        assert report.loaded == len(src.state_dict()) - 2


def test_truncated_file(tmp_path) -> None:
    path = save_weights(create_model("resnet20"), tmp_path / "w.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReslabError, match=r"w\.pth: not a readable checkpoint \(truncated or corrupt\?\)"):
        load_weights(create_model("resnet20"), path)
    st = save_weights(create_model("resnet20"), tmp_path / "w.safetensors")
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ReslabError, match=r"w\.safetensors: not a readable safetensors file"):
        load_weights(create_model("resnet20"), st)


def test_foreign_files(tmp_path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(ReslabError, match=r"notes\.pth"):
        load_weights(create_model("resnet20"), text)
    whole = tmp_path / "whole.pt"
    torch.save(create_model("resnet20"), whole)  # a pickled module: code, not weights
    with pytest.raises(ReslabError, match="will not unpickle"):
        load_weights(create_model("resnet20"), whole)
    with pytest.raises(ReslabError, match="no such checkpoint file"):
        load_weights(create_model("resnet20"), tmp_path / "missing.pth")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(ReslabError, match="no state dict found"):
        load_weights(create_model("resnet20"), tmp_path / "meta.pth")
