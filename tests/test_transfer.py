"""Transfer learning: sources, freezing that really freezes, the unfreeze schedule, channel adaptation."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from reslab import ReslabError, create_model
from reslab.cli import main
from reslab.config import FinetuneConfig, build
from reslab.engine import fit
from reslab.transfer import Freezer, adapt_first_conv, load_source
from reslab.weights import read_file
from tests.fakedata import write_folder


@pytest.fixture
def source(tmp_path) -> Path:
    """A reslab checkpoint of a ResNet-20 briefly trained on the embedded digits (3 channels)."""
    from reslab.config import load_config

    fit(
        load_config(
            overrides={
                "device": "cpu",
                "model": "resnet20",
                "model_args": {"in_chans": 3},
                "data.limit_train": 256,
                "iters": 4,
                "data.batch_size": 64,
                "progress": False,
                "out": str(tmp_path / "src"),
            }
        )
    )
    return tmp_path / "src" / "last.pt"


def test_freezer_schedule_and_groups() -> None:
    model = create_model("resnet20")
    freezer = Freezer(model, FinetuneConfig(freeze="base", unfreeze_at=["2:2", "4:3"]))
    assert freezer.apply(0) == ["head"] and freezer.apply(1) == ["head"]
    assert freezer.apply(2) == ["layer2", "layer3", "head"]
    assert freezer.apply(4) == ["layer1", "layer2", "layer3", "head"]
    assert not model.conv1.weight.requires_grad and model.layer1[0].conv1.weight.requires_grad
    groups = freezer.param_groups(0.01, 0.001, 1e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("stem", 0.001),
        ("layer1", 0.001),
        ("layer2", 0.001),
        ("layer3", 0.001),
        ("head", 0.01),
    ]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert Freezer(model, FinetuneConfig(freeze="stages:1")).apply(0) == ["layer2", "layer3", "head"]
    with pytest.raises(ReslabError, match="--freeze 'stages:9'"):
        Freezer(model, FinetuneConfig(freeze="stages:9"))
    with pytest.raises(ReslabError, match="unfreeze_at='soon': must be EPOCH:N"):
        build(FinetuneConfig, {"unfreeze_at": ["soon"]})


def test_finetune_freezes_then_unfreezes_at_the_right_epoch(source, tmp_path) -> None:
    root = write_folder(tmp_path / "imgs", size=(28, 28), per_class=12)
    out = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                "--from",
                str(source),
                "--data-dir",
                str(root),
                "--epochs",
                "2",
                "--unfreeze-at",
                "1:1",
                "--batch-size",
                "12",
                "--out",
                str(out),
                "--no-progress",
                "log_every=1",
            ]
        )
        == 0
    )
    src = read_file(source)["model"]
    ft = read_file(out / "last.pt")
    assert ft["classes"] == ["cat", "dog", "fish"] and ft["model"]["fc.weight"].shape == (3, 64)
    # the log shows the head's learning rate, not the frozen stem's (a tenth of it)
    head_lr = next(g["lr"] for g in ft["optimizer"]["param_groups"] if g.get("name") == "head")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lr"] == head_lr and head_lr > ft["optimizer"]["param_groups"][0]["lr"]
    same = lambda k: torch.equal(src[k], ft["model"][k])  # noqa: E731
    # stem and layers 1-2 never trained: weights *and* BN statistics unchanged
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer2.2.bn2.running_var",
        "layer2.2.bn2.num_batches_tracked",
    ):
        assert same(key), key
    assert not same("layer3.2.conv2.weight") and not same("layer3.2.bn2.running_mean")  # unfrozen at epoch 2
    config = yaml.safe_load((out / "config.yaml").read_text())
    policy = yaml.safe_load((out / "policy.yaml").read_text())
    assert policy["kind"] == "finetune" and policy["config"]["unfreeze_at"] == ["1:1"]
    assert config["data"]["val_split"] == 0.0  # test/ exists


def test_finetune_run_resumes_exactly_with_its_policy(source, tmp_path, monkeypatch) -> None:
    """A fine-tuning run cut by Ctrl-C before its unfreezing epoch, resumed with `train --resume`:
    the policy (frozen parts, BN modes, the unfreeze schedule) comes back from the checkpoint."""
    from reslab.engine.train import SIGINT_AT

    root = write_folder(tmp_path / "imgs", size=(28, 28), per_class=12)
    args = [
        "finetune",
        "--from",
        str(source),
        "--data-dir",
        str(root),
        "--epochs",
        "3",
        "--unfreeze-at",
        "2:2",
    ]
    args += ["--batch-size", "12", "--no-progress", "--out"]
    assert main([*args, str(tmp_path / "straight")]) == 0
    monkeypatch.setenv(SIGINT_AT, "4")  # epoch 2 of 3 (3 steps per epoch), before layer2 unfreezes
    assert main([*args, str(tmp_path / "cut")]) == 130
    monkeypatch.delenv(SIGINT_AT)
    assert read_file(tmp_path / "cut" / "last.pt")["policy"]["config"]["unfreeze_at"] == ["2:2"]
    # The engine rebuilds the policy from the checkpoint: the library resumes as the CLI does.
    assert fit(resume=tmp_path / "cut", progress=False).iterations == 9
    a, b = read_file(tmp_path / "straight" / "last.pt"), read_file(tmp_path / "cut" / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    src = read_file(source)["model"]
    assert torch.equal(src["layer1.0.conv1.weight"], b["model"]["layer1.0.conv1.weight"])  # still frozen
    assert not torch.equal(src["layer2.0.conv1.weight"], b["model"]["layer2.0.conv1.weight"])  # unfrozen


def test_frozen_batchnorm_in_3d_models_is_exact_and_stays_frozen() -> None:
    """FrozenBatchNorm and the fine-tuning BN modes work for video models as for images."""
    from reslab.models.layers import FrozenBatchNorm, freeze_batchnorm

    torch.manual_seed(0)
    model = create_model("r3d_18", num_classes=4)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        ref = model.eval()(x)
        frozen = freeze_batchnorm(create_model("r3d_18", num_classes=4))
        frozen.load_state_dict(model.state_dict())  # BatchNorm's step counters are dropped on the way
        assert any(isinstance(m, FrozenBatchNorm) for m in frozen.modules())
        torch.testing.assert_close(frozen.train()(x), ref, rtol=1e-5, atol=1e-5)  # train mode: same map
    freezer = Freezer(model, FinetuneConfig(freeze="base"))
    freezer.apply(0)
    freezer.train_mode(model)
    assert not model.layer1[0].conv1[1].training and model.fc.training  # frozen BN3d in eval, head trains


def test_frozen_base_head_only_and_frozen_batchnorm(source, tmp_path, capsys) -> None:
    root = write_folder(tmp_path / "imgs", size=(28, 28), per_class=12, splits=("train",))
    out = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                "--from",
                str(source),
                "--data-dir",
                str(root),
                "--epochs",
                "1",
                "--frozen-bn",
                "--batch-size",
                "12",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    ft = read_file(out / "last.pt")
    assert "layer3.2.bn2.num_batches_tracked" not in ft["model"]  # FrozenBatchNorm keeps no counter
    src = read_file(source)["model"]
    assert torch.equal(src["layer3.2.conv2.weight"], ft["model"]["layer3.2.conv2.weight"])
    assert ft["config"]["data"]["val_split"] == 0.2  # no val/ or test/ folder: 20% held out
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["split"] == "val"
        and report["n"] == 6
        and list(report["per_class_acc"]) == ["cat", "dog", "fish"]
    )
    assert report["top5_err"] is None  # three classes: top-5 would always be right


def test_torchvision_weights_from_a_temporary_cache(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ref = torchvision.models.resnet18()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(ref.state_dict(), cache / "resnet18-f37072fd.pth")
    pre = load_source("torchvision:resnet18.IMAGENET1K_V1")
    assert (
        pre.arch == "resnet18"
        and len(pre.preprocess.classes) == 1000
        and pre.preprocess.classes[0] == "tench"
    )
    assert pre.preprocess.mean == (0.485, 0.456, 0.406) and pre.preprocess.size == (224, 224)
    root = write_folder(tmp_path / "photos", size=(72, 90), per_class=4, fmt="jpg")
    out = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                "--from",
                "torchvision:resnet18.IMAGENET1K_V1",
                "--data-dir",
                str(root),
                "--epochs",
                "1",
                "--batch-size",
                "6",
                "--out",
                str(out),
                "--no-progress",
                "data.workers=0",
            ]
        )
        == 0
    )
    ft = read_file(out / "last.pt")
    assert ft["preprocess"]["resize"] == 256 and ft["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert torch.equal(ft["model"]["conv1.weight"], ref.state_dict()["conv1.weight"])  # frozen base kept


def test_offline_without_cache_fails_in_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ReslabError) as err:
        load_source("torchvision:resnet50.IMAGENET1K_V2")
    msg = str(err.value)
    assert "\n" not in msg and "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in msg
    assert str(tmp_path / "empty" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in msg


def test_in_channel_adaptation_preserves_a_grey_image() -> None:
    torch.manual_seed(0)
    rgb = create_model("resnet18").eval()
    grey = create_model("resnet18", in_chans=1).eval()
    sd = rgb.state_dict()
    sd["conv1.weight"] = adapt_first_conv(sd["conv1.weight"], 1, "sum")
    grey.load_state_dict(sd)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)
    five = adapt_first_conv(sd["conv1.weight"].new_ones(4, 3, 3, 3), 5, "repeat")
    assert five.shape == (4, 5, 3, 3) and torch.allclose(five.sum(1), torch.full((4, 3, 3), 3.0))
