"""reslab on the Hugging Face Hub, without a network: weights by name from real folders in the layouts
huggingface_hub reads (its cache, with HF_HUB_OFFLINE=1) and timm writes (``save_for_hf``), and
models out in timm's layout, loaded back by timm and by reslab. Only the upload itself is not run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from timm.models import save_for_hf

import reslab
from reslab.cli import main
from reslab.errors import ReslabError
from tests.fakedata import write_folder


def _hub_cache(root: Path, repo: str, model: torch.nn.Module, revisions: dict[str, int]) -> None:
    """``repo`` in huggingface_hub's cache layout: one snapshot per revision (``refs/NAME`` -> a
    commit), each written by timm's own ``save_for_hf``, its weights shifted by the revision's
    number so that revisions differ."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    for name, shift in revisions.items():
        commit = f"{shift:040x}"
        with torch.no_grad():
            model.fc.bias.fill_(float(shift))
        save_for_hf(model, base / "snapshots" / commit, safe_serialization=True)
        (base / "refs" / name).write_text(commit)


def offline(monkeypatch, cache: Path) -> None:
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE=cache, as huggingface_hub reads them when it is imported
    (its constants; the environment for what reslab says)."""
    import huggingface_hub.constants as constants

    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> tuple[Path, torch.nn.Module]:
    """An offline Hub cache holding timm/resnet18.test (main and a v1 revision)."""
    cache = tmp_path / "hf-cache"
    offline(monkeypatch, cache)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    _hub_cache(cache, "timm/resnet18.test", model, {"main": 0, "v1": 1})
    with torch.no_grad():
        model.fc.bias.fill_(0.0)  # as main holds it
    return cache, model


def test_weights_by_name_from_the_hubs_cache_give_timms_outputs(hub) -> None:
    _, theirs = hub
    ours = reslab.create_model("resnet18", pretrained="hf-hub:timm/resnet18.test").eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(ours(x), theirs(x))
    pinned = reslab.create_model("resnet18", pretrained="hf-hub:timm/resnet18.test@v1").eval()
    torch.testing.assert_close(pinned(x), theirs(x) + 1.0)  # the v1 revision's bias
    head = reslab.create_model("resnet18", pretrained="hf-hub:timm/resnet18.test", num_classes=5)
    assert head.fc.out_features == 5 and torch.equal(head.conv1.weight, ours.conv1.weight)
    from reslab.weights import load_weights

    load_weights(head, "hf-hub:timm/resnet18.test", ignore_head=True)  # load_weights takes the name too


def test_the_weights_preprocessing_and_classes_come_along(hub, tmp_path, capsys) -> None:
    from reslab.engine import read_checkpoint
    from reslab.transfer import finetune_config

    ckpt = read_checkpoint("hf-hub:timm/resnet18.test", device="cpu")
    pre = ckpt.preprocess  # timm's a1_in1k recipe: bicubic, crop_pct 0.95
    assert (pre.size, pre.resize, pre.interpolation) == ((224, 224), 235, "bicubic")
    assert ckpt.classes[:2] == ["tench", "goldfish"] and len(ckpt.classes) == 1000
    photos = write_folder(tmp_path / "photos", size=(72, 90), per_class=4, fmt="jpg")
    cfg, policy = finetune_config("hf-hub:timm/resnet18.test", str(photos))
    assert (cfg.model, cfg.data.image_size, cfg.data.resize) == ("resnet18", 224, 235)
    assert policy.pretrained.preprocess.interpolation == "bicubic"
    photo = sorted((photos / "test" / "cat").iterdir())[0]
    args = ["predict", "--checkpoint", "hf-hub:timm/resnet18.test", str(photo), "--json", "--device", "cpu"]
    assert main(args) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"][0]
    assert top["class"] == ckpt.classes[top["index"]]


def test_names_that_cannot_be_had_are_one_line(hub, tmp_path, capsys) -> None:
    with pytest.raises(
        ReslabError, match=r"not in the local cache .* and HF_HUB_OFFLINE is set; download it once"
    ):
        reslab.create_model("resnet18", pretrained="hf-hub:timm/not-cached")
    with pytest.raises(ReslabError, match="holds a resnet18, not a resnet50"):
        reslab.create_model("resnet50", pretrained="hf-hub:timm/resnet18.test")
    with pytest.raises(ReslabError, match=r"no revision 'v9'|not in the local cache"):
        reslab.create_model("resnet18", pretrained="hf-hub:timm/resnet18.test@v9")
    assert main(["eval", "--checkpoint", f"local-dir:{tmp_path / 'nothing'}", "--device", "cpu"]) == 2
    assert "local-dir:" in capsys.readouterr().err
    from huggingface_hub import errors

    from reslab.hub import hub_errors

    class Response:  # what the Hub sends for a private repository and no token
        status_code, headers, url, request = 401, {}, "https://huggingface.co", None

    with (
        pytest.raises(ReslabError, match="or a private one and no token was given"),
        hub_errors("hf-hub:me/private"),
    ):
        raise errors.RepositoryNotFoundError("401 Client Error", response=Response())


def test_a_run_goes_out_in_timms_layout_with_a_card(tmp_path, capsys, monkeypatch) -> None:
    from reslab.deploy import share

    run = tmp_path / "run"
    tiny = ["data.limit_train=64", "data.limit_test=40", "data.batch_size=32", "device=cpu"]
    assert main(["train", "--iters", "2", "--no-progress", "--out", str(run), *tiny]) == 0
    out = tmp_path / "shared"
    assert main(["push", str(run), "--repo", "me/digits", "--local-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "curves.png",
        "model.safetensors",
    ]
    config = json.loads((out / "config.json").read_text())
    assert (
        config["architecture"] == "resnet20" and config["num_classes"] == 10 and config["num_features"] == 64
    )
    assert config["label_names"] == [str(i) for i in range(10)]
    assert config["pretrained_cfg"]["input_size"] == [1, 28, 28]
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert (
        front["library_name"] == "reslab"
        and front["license"] == "apache-2.0"
        and "image-classification" in front["tags"]
    )
    summary = json.loads((run / "summary.json").read_text())
    assert f"error {100 * summary['eval_err']:.2f}%" in card and "![training curves](curves.png)" in card
    assert "command: `" in card and "hf-hub:me/digits" in card
    back = reslab.create_model("resnet20", pretrained=f"local-dir:{out}", in_chans=1).eval()
    from reslab.engine import read_checkpoint

    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(back(x), read_checkpoint(run / "last.pt", device="cpu").model(x))
    # push: everything up to the upload (the one network call) runs; the folder it is handed is the same
    sent = {}

    def upload(folder, repo, *, private=False, revision=None):
        sent.update(files=sorted(p.name for p in folder.iterdir()), repo=repo, private=private)
        return "https://huggingface.co/me/digits/commit/0"

    monkeypatch.setattr(share, "upload", upload)
    offline(monkeypatch, tmp_path / "empty-cache")
    assert main(["push", str(run), "--repo", "me/digits", "--private"]) == 0
    assert sent == {
        "files": ["README.md", "config.json", "curves.png", "model.safetensors"],
        "repo": "me/digits",
        "private": True,
    }


def test_timm_loads_every_timm_architecture_reslab_saves(tmp_path) -> None:
    """save_pretrained of a timm architecture: timm.create_model("local-dir:DIR") builds it and
    gives the same outputs, unchanged."""
    for name in ("resnet10t", "seresnext26t_32x4d"):
        model = reslab.create_model(name, num_classes=7).eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var.uniform_(0.5, 1.5)
        folder = reslab.save_pretrained(model, tmp_path / name)
        theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(theirs(x), model(x), rtol=0, atol=0)
        front = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
        assert front["library_name"] == "timm"


def test_pushing_over_another_architecture_is_refused_and_nothing_half_written(tmp_path, monkeypatch) -> None:
    from reslab.deploy import share

    cache = tmp_path / "hf-cache"
    offline(monkeypatch, cache)
    _hub_cache(cache, "me/model", timm.create_model("resnet18", pretrained=False), {"main": 0})
    ckpt = tmp_path / "r20.pt"
    reslab.save_weights(reslab.create_model("resnet20"), ckpt)
    monkeypatch.setattr(share, "upload", lambda *a, **k: pytest.fail("uploaded"))
    with pytest.raises(ReslabError, match=r"me/model holds a resnet18 .* this is a resnet20"):
        share.push(str(ckpt), "me/model")
    with pytest.raises(ReslabError, match="3 class names for a model of 10 classes"):
        reslab.save_pretrained(reslab.create_model("resnet20"), tmp_path / "out", classes=["a", "b", "c"])
    assert not [p for p in tmp_path.iterdir() if "out" in p.name]  # nothing half-written
