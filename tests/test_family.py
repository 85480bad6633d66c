"""The ResNet family: variants from the one spec, video, backbones, embeddings, ensembles and TTA."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from reslab import ReslabError, create_model, list_models
from reslab.complexity import count_params
from reslab.config import load_config
from reslab.models.layers import DropPath
from tests.conftest import shared_data
from tests.fakedata import write_folder

CONTRACT = [
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "wrn16_8",
    "wrn28_10",
    "wrn40_4",
    "preact_resnet18",
    "preact_resnet34",
    "preact_resnet50",
    "preact_resnet101",
    "preact_resnet152",
    "preact_resnet110",
    "preact_resnet164",
    "preact_resnet1001",
    "resnet26d",
    "resnet34d",
    "resnet50c",
    "resnet50d",
    "resnet50s",
    "resnet101d",
    "resnet152d",
    "seresnet50",
    "resnext50d_32x4d",
    "r3d_18",
    "mc3_18",
    "r2plus1d_18",
    "r3d_34",
    "r3d_50",
    # the CIFAR-style ImageNet-depth ResNets (issue: "the CIFAR-style ResNet-18/34/50 people actually use")
    "resnet18_cifar",
    "resnet34_cifar",
    "resnet50_cifar",
    "resnet101_cifar",
    "resnet152_cifar",
    "preact_resnet18_cifar",
]


def test_contract_names_are_registered() -> None:
    assert set(CONTRACT) <= set(list_models())


def test_wide_resnets() -> None:
    assert round(count_params(create_model("wrn28_10")) / 1e6, 1) == 36.5  # the WRN paper's 36.5M
    model = create_model("wrn34_2")  # any wrn{d}_{k}, built on demand
    assert model.spec.widths == (32, 64, 128) and model.spec.depths == (5, 5, 5)
    with pytest.raises(ReslabError, match="6n\\+4 layers"):
        create_model("wrn27_2")
    drop = create_model("wrn16_4", dropout=0.3)
    assert sum(isinstance(m, nn.Dropout) for m in drop.modules()) == 6


def test_preactivation_keeps_the_identity_path_clean() -> None:
    model = create_model("preact_resnet18")
    block = model.layer1[1]
    assert list(dict(block.named_children()))[:2] == ["bn1", "conv1"]  # BN-ReLU-conv order
    for p in block.parameters():
        nn.init.zeros_(p)
    x = -torch.rand(1, 64, 8, 8)  # negative: a post-activation block would return relu(x) = 0
    torch.testing.assert_close(block(x), x)
    assert round(count_params(create_model("preact_resnet164")) / 1e6, 1) == 1.7  # He et al. 2016, Table 2
    assert model.norm is not None  # the final BN-ReLU before pooling


def test_resnet_d_shortcut_pools_before_projecting() -> None:
    model = create_model("resnet50d")
    down = model.layer2[0].downsample
    assert isinstance(down[0], nn.AvgPool2d) and down[1].stride == (1, 1)
    assert isinstance(model.layer1[0].downsample[0], nn.Identity)  # stride 1: nothing to pool
    assert len(model.conv1) == 7  # the deep stem


@pytest.mark.parametrize("name", list_models())
def test_stochastic_depth_on_every_residual_model(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name, drop_path_rate=0.2)
    rates = [b.drop_path.p for b in model.blocks() if isinstance(b.drop_path, DropPath)]
    if model.spec.residual:
        assert rates and max(rates) == pytest.approx(0.2)
    else:
        assert not rates  # plain nets have no residual branch to drop


def test_dilated_resnet_d_backbone() -> None:
    model = create_model("resnet50d", features_only=True, output_stride=8, out_indices=(4,)).eval()
    with torch.no_grad():
        (out,) = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 2048, 8, 8)


def test_video_training_on_synthetic_clips(tmp_path) -> None:
    cfg = load_config(
        overrides={
            "device": "cpu",
            "model": "r3d_18",
            "data.name": "synthetic_clips",
            "data.frames": 4,
            "data.limit_train": 32,
            "data.limit_test": 64,
            "data.batch_size": 8,
            "data.eval_batch_size": 16,
            "iters": 3,
            "progress": False,
            "out": str(tmp_path / "v"),
        }
    )
    from reslab.engine import fit

    result = fit(cfg)
    assert result.iterations == 3
    from reslab.inference import evaluate_checkpoints

    report = evaluate_checkpoints([str(tmp_path / "v" / "last.pt")], device="cpu")
    assert report["n"] == 256 and report["data"] == "synthetic_clips"  # the whole test split
    # the run's own evaluation used 64 clips; the checkpoint's model on those gives the run's number
    assert report["per_class_acc"].keys() == {"right", "left", "down", "up"}
    assert result.eval_err == pytest.approx(result.summary["eval_err"])


def test_clip_folders_of_frames_and_video_files(tmp_path) -> None:
    from PIL import Image

    from reslab.data.video import load_clip_folder, synthetic_clips

    clips = synthetic_clips(4, frames=6, size=24)
    for i, (clip, label) in enumerate(zip(clips.images, clips.labels, strict=True)):
        d = tmp_path / "frames" / clips.classes[label] / f"clip{i}"
        d.mkdir(parents=True)
        for t in range(clip.shape[1]):
            Image.fromarray(clip[:, t].permute(1, 2, 0).numpy()).save(d / f"{t:03d}.png")
    loaded = load_clip_folder(tmp_path / "frames", frames=3, size=16)
    assert loaded.images.shape == (4, 3, 3, 16, 16) and sorted(loaded.classes) == sorted(clips.classes)
    av = pytest.importorskip("av")
    path = tmp_path / "videos" / "right" / "a.mp4"
    path.parent.mkdir(parents=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for t in range(8):
            frame = torch.zeros(32, 32, 3, dtype=torch.uint8)
            frame[8:16, 4 * t : 4 * t + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame.numpy(), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    video = load_clip_folder(tmp_path / "videos", frames=4, size=16)
    assert video.images.shape == (1, 3, 4, 16, 16)
    bright = video.images[0].float().mean(0) > 100
    xs = [bright[t].nonzero()[:, 1].float().mean().item() for t in range(4)]
    assert xs == sorted(xs) and xs[-1] > xs[0]  # the square moves right


def _image(path) -> torch.Tensor:
    from torchvision.io import decode_image

    return decode_image(str(path)).float() / 255


def test_detection_backbones(tmp_path) -> None:
    from torchvision.models.detection import FasterRCNN, MaskRCNN

    from reslab.backbones import fpn_backbone
    from reslab.models.layers import FrozenBatchNorm

    try:
        img = _image(sorted(shared_data("imagenet-samples").glob("*.JPEG"))[0])
    except pytest.skip.Exception:
        img = torch.rand(3, 150, 200)
    src = create_model("resnet18")
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    backbone = fpn_backbone("resnet18", weights=tmp_path / "r18.pth", trainable_stages=2)
    assert any(isinstance(m, FrozenBatchNorm) for m in backbone.modules())
    assert torch.equal(backbone.body.conv1.weight, src.conv1.weight)
    detector = FasterRCNN(backbone, num_classes=3, min_size=160, max_size=200).eval()
    with torch.no_grad():
        (out,) = detector([img])
    assert set(out) == {"boxes", "labels", "scores"}
    model = MaskRCNN(
        fpn_backbone("resnet50d", zero_init_residual=True), num_classes=3, min_size=128, max_size=160
    )
    model.train()
    h, w = img.shape[1:]
    masks = torch.zeros(1, h, w, dtype=torch.uint8)
    masks[0, h // 4 : h // 2, w // 4 : w // 2] = 1
    target = {
        "boxes": torch.tensor([[w / 4, h / 4, w / 2, h / 2]]),
        "labels": torch.tensor([1]),
        "masks": masks,
    }
    frozen = model.backbone.body.layer1[0].conv1.weight.clone()
    # (the residual branches start at zero and pass no gradient yet; the projection shortcut does)
    trainable = model.backbone.body.layer4[0].downsample[1].weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = model([img], [target])
    assert set(losses) >= {"loss_classifier", "loss_mask", "loss_objectness"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    opt.step()
    assert torch.equal(model.backbone.body.layer1[0].conv1.weight, frozen)  # stage 1 frozen
    assert not torch.equal(model.backbone.body.layer4[0].downsample[1].weight, trainable)


def _checkpoint(tmp_path, name: str, seed: int, arch: str = "resnet20"):
    """A reslab checkpoint trained for a few iterations on a tiny colour folder."""
    from reslab.engine import fit

    root = tmp_path / "imgs"
    if not root.exists():
        write_folder(root, size=(32, 32), per_class=16)
    cfg = load_config(
        overrides={
            "device": "cpu",
            "model": arch,
            "data.name": "folder",
            "data.dir": str(root),
            "data.batch_size": 16,
            "data.cache_dir": str(tmp_path / "cache"),
            "epochs": 2,
            "seed": seed,
            "progress": False,
            "out": str(tmp_path / name),
        }
    )
    fit(cfg)
    return tmp_path / name / "last.pt", root


def test_embeddings_and_search(tmp_path, capsys) -> None:
    from reslab.cli import main

    ckpt, root = _checkpoint(tmp_path, "emb", 0)
    assert (
        main(["embed", "--checkpoint", str(ckpt), str(root / "test"), "--out", str(tmp_path / "index.npy")])
        == 0
    )
    capsys.readouterr()
    emb = __import__("numpy").load(tmp_path / "index.npy")
    assert emb.shape == (48, 64) and abs(float((emb**2).sum(1).mean()) - 1) < 1e-5
    query = sorted((root / "test" / "dog").iterdir())[3]
    assert main(["search", "--index", str(tmp_path / "index.npy"), str(query), "--json", "--topk", "3"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    best = result["matches"][0]
    assert best["file"] == str(query) and best["similarity"] == pytest.approx(1.0, abs=1e-4)


def test_ensemble_and_tta(tmp_path, capsys) -> None:
    from reslab.cli import main
    from reslab.inference import TTA, combine

    a, _ = _checkpoint(tmp_path, "a", 0)
    b, root = _checkpoint(tmp_path, "b", 1, arch="plain20")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(a), str(b), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [m["arch"] for m in report["members"]] == ["resnet20", "plain20"] and report["n"] == 48
    assert main(["eval", "--checkpoint", str(a), "--json", "--tta", "10crop"]) == 0
    assert json.loads(capsys.readouterr().out)["tta"] == "10crop"
    # TTA changes the outputs as it should: the mean of the softmax over an image and its mirror.
    from reslab.inference import load_members

    cpu = torch.device("cpu")
    net, flipped = (
        load_members([str(a)], None, cpu).nets[0],
        load_members([str(a)], None, cpu, "flip").nets[0],
    )
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ((net(x).softmax(1) + net(x.flip(-1)).softmax(1)) / 2).log()
        torch.testing.assert_close(flipped(x), expected)
        assert not torch.allclose(flipped(x), net(x).log_softmax(1), atol=1e-3)
    assert main(["predict", "--checkpoint", str(a), str(b), str(root / "test" / "cat"), "--json"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 16 and all(abs(sum(t["prob"] for t in p["top"]) - 1) < 1e-4 for p in preds)
    # The combination is the log of the mean of the members' probabilities.
    la, lb = torch.randn(4, 3).log_softmax(1), torch.randn(4, 3).log_softmax(1)
    torch.testing.assert_close(combine([la, lb]).exp(), (la.exp() + lb.exp()) / 2)
    tta = TTA(nn.Identity(), "10crop", crop=8, pad=2)
    x = torch.randn(2, 3, 8, 8)
    views = tta.views(x)
    assert len(views) == 10 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[4], x)  # the centre crop of the padded image is the image
    assert len(TTA(nn.Identity(), "flip").views(x)) == 2


def test_attention_and_anti_aliasing_plug_into_any_spec() -> None:
    """ECA, SE and anti-aliased downsampling are layer types: any network takes them, by name or as
    a callable, as norm_layer and act_layer."""
    from reslab.models.layers import AvgPoolAA, BlurPool, EfficientChannelAttention, SqueezeExcite

    eca56 = create_model("resnet56", attn_layer="eca").eval()
    assert all(isinstance(b.se, EfficientChannelAttention) for b in eca56.blocks())
    assert eca56(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    se3d = create_model("r3d_18", attn_layer="se", num_classes=4).eval()
    assert all(isinstance(b.se, SqueezeExcite) for b in se3d.blocks())
    assert se3d(torch.randn(1, 3, 4, 32, 32)).shape == (1, 4)
    blur = create_model("resnet20", aa_layer="blur")
    strided = [b for b in blur.blocks() if b.stride > 1]
    assert len(strided) == 2 and all(isinstance(b.aa, BlurPool) and b.conv1.stride == (1, 1) for b in strided)
    assert blur(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    custom = create_model("resnet20", attn_layer=lambda c, ndim: torch.nn.Identity())
    assert all(isinstance(b.se, torch.nn.Identity) for b in custom.blocks())
    aa50 = create_model("resnetaa50d")
    assert isinstance(aa50.maxpool, AvgPoolAA) and isinstance(aa50.layer2[0].aa, AvgPoolAA)
    with pytest.raises(ReslabError, match="attn_layer='cbam': choose one of se, eca"):
        create_model("resnet20", attn_layer="cbam")
    with pytest.raises(ReslabError, match="anti-aliased downsampling is 2D only"):
        create_model("r3d_18", aa_layer="blur")


def test_eca_kernel_grows_with_channels_and_blur_keeps_constants() -> None:
    from reslab.models.layers import BlurPool, EfficientChannelAttention

    # ECA's adaptive rule (gamma 2, b 1): k = int((log2 C + 1) / 2), made odd, at least 3
    sizes = {c: EfficientChannelAttention(c).conv.kernel_size[0] for c in (16, 64, 256, 512, 2048)}
    assert sizes == {16: 3, 64: 3, 256: 5, 512: 5, 2048: 7}
    blur = BlurPool(4, stride=2)
    x = torch.full((1, 4, 8, 8), 3.0)
    torch.testing.assert_close(blur(x), torch.full((1, 4, 4, 4), 3.0))  # a normalised low-pass filter
    impulse = torch.zeros(1, 1, 5, 5)
    impulse[0, 0, 2, 2] = 16
    assert BlurPool(1, stride=1)(impulse)[0, 0, 1:4, 1:4].tolist() == [[1, 2, 1], [2, 4, 2], [1, 2, 1]]


def test_pruned_widths_are_data_checked_against_the_wiring() -> None:
    from reslab.models.spec import ResNetSpec

    model = create_model("ecaresnet50d_pruned")
    assert model.layer1[0].widths == (47, 18, 19) and model.num_features == 2022
    assert model.layer4[0].se.conv.kernel_size == (7,)  # the unpruned network's ECA kernel
    bad = ((8, 8, 32), (8, 8, 16))  # two blocks of one stage must end in the same width
    with pytest.raises(ReslabError, match="stage 1 end in different widths"):
        ResNetSpec(block="bottleneck", depths=(2,), widths=(8,), block_widths=bad)
    with pytest.raises(ReslabError, match="one tuple of 3 widths per block"):
        ResNetSpec(block="bottleneck", depths=(2,), widths=(8,), block_widths=((8, 8, 32),))


def test_cifar_style_resnet18_trains_with_the_fast_recipe(tmp_path, capsys) -> None:
    from reslab.cli import main

    root = write_folder(tmp_path / "imgs", size=(32, 32), per_class=16)
    args = ["train", "--model", "resnet18_cifar", "--config", "cifar10_fast", "--data-dir", str(root)]
    args += [
        "--iters",
        "2",
        "--batch-size",
        "16",
        "--no-progress",
        "--out",
        str(tmp_path / "r"),
        "channels_last=false",
    ]
    assert main(args) == 0
    config = __import__("yaml").safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert (
        config["model"] == "resnet18_cifar"
        and config["data"]["name"] == "folder"
        and config["optim"]["nesterov"]
    )
    ckpt = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert ckpt["model"]["conv1.weight"].shape == (64, 3, 3, 3) and "maxpool" not in str(ckpt["model"].keys())
