"""The GPU image pipeline, exercised on the CPU: the same function decodes and transforms batches
there (libjpeg-turbo instead of nvjpeg), so crops, interpolation, skips and resume are tested here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from reslab.config import DataConfig
from reslab.data import BatchDecodeLoader, FolderLoader, Placement, build_data, imagenet_transforms
from reslab.data.decode import random_resized_crop, resize_matrix, resized_size
from tests.conftest import shared_data
from tests.fakedata import write_folder

PIXELS = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)  # normalisation that leaves 0-255 values


def test_resize_weights_are_torchvision_antialiased_bilinear() -> None:
    """The matrix product equals torch's antialiased bilinear resize, down and up, and a crop of the
    input or of the output is a sub-range of the same weights."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 75, 100, dtype=torch.float64) * 255
    for out in ((40, 53), (90, 130)):

        def axis(
            n_in: int,
            n_out: int,
            start: int = 0,
            length: int | None = None,
            offset: int = 0,
            count: int | None = None,
        ):
            t = torch.tensor
            return resize_matrix(
                t([start]), t([length or n_in]), t([n_out]), t([offset]), count or n_out, n_in
            )[0].double()

        ref = F.interpolate(x, size=out, mode="bilinear", antialias=True)
        torch.testing.assert_close(
            axis(75, out[0]) @ x @ axis(100, out[1]).T, ref, rtol=0, atol=3e-3
        )  # float32 weights: 1e-5 of 255
        crop = F.interpolate(x[..., 10:60, 20:90], size=out, mode="bilinear", antialias=True)
        got = axis(75, out[0], 10, 50) @ x @ axis(100, out[1], 20, 70).T
        torch.testing.assert_close(got, crop, rtol=0, atol=3e-3)  # float32 weights: 1e-5 of 255
        centre = ref[..., 5:25, 7:37]  # resize, then keep a window of the output
        got = axis(75, out[0], offset=5, count=20) @ x @ axis(100, out[1], offset=7, count=30).T
        torch.testing.assert_close(got, centre, rtol=0, atol=3e-3)  # float32 weights: 1e-5 of 255


def test_crops_and_flips_are_the_cpu_paths_draws() -> None:
    """Replaying torchvision's RandomResizedCrop and flip with a sample's seed gives its boxes,
    including the fallback for extreme aspect ratios."""
    rrc, flip = v2.RandomResizedCrop(224), v2.RandomHorizontalFlip()
    img = torch.zeros(3, 1, 1)
    for seed, (h, w) in enumerate([(375, 500), (500, 333), (40, 4000), (4000, 40), (224, 224)] * 20):
        torch.manual_seed(seed)
        params = rrc.make_params([v2.functional.resize(img, [h, w])])
        mirrored = not bool(torch.rand(1) >= flip.p)
        assert random_resized_crop(h, w, seed) == (
            params["top"],
            params["left"],
            params["height"],
            params["width"],
            mirrored,
        )
    assert resized_size(375, 500, 256) == (256, 341) and resized_size(500, 333, 256) == (384, 256)


def _pair(samples, train: bool, seed: int = 7):
    """The PIL path and the batched path over the same files, in file order."""
    cpu = FolderLoader(
        samples,
        imagenet_transforms(train, 224, 256),
        batch_size=8,
        train=False,
        channels=3,
        workers=0,
        place=Placement(seed=seed),
        **PIXELS,
    )
    batched = BatchDecodeLoader(
        samples,
        batch_size=8,
        train=train,
        size=224,
        resize=256,
        channels=3,
        workers=0,
        place=Placement(seed=seed),
        **PIXELS,
    )
    batched.sampler.shuffle = False  # the PIL loader above keeps file order: compare image by image
    return cpu, batched


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_real_jpegs_match_the_cpu_path_within_a_grey_level(train: bool) -> None:
    files = sorted(shared_data("imagenet-samples").glob("*.JPEG"))[:24]
    cpu, batched = _pair([(str(f), 0) for f in files], train)
    a = torch.cat([x for x, _ in cpu])
    b = torch.cat([x for x, _ in batched])
    diff = (a - b).abs()
    # the same crops; PIL resizes in fixed point, the batched path in float: rounding apart, at most 1 level
    assert a.shape == b.shape == (24, 3, 224, 224) and diff.max() <= 1.0 and diff.mean() < 0.3


def test_skips_are_named_and_resume_is_exact(tmp_path, capsys) -> None:
    root = write_folder(
        tmp_path / "imgs", size=(60, 80), per_class=6, fmt="jpg", corrupt_one=True, grey_one=True
    )
    (root / "train" / "dog" / "truncated.jpg").write_bytes(
        (root / "train" / "dog" / "0001.jpg").read_bytes()[:200]
    )
    cfg = DataConfig(name="folder", dir=str(root), batch_size=4, image_size=32, decode="gpu", workers=0)
    with pytest.warns(UserWarning, match="decode=gpu without a CUDA device"):
        data = build_data(cfg, place=Placement(seed=3), progress=False)
    assert isinstance(data.train, BatchDecodeLoader)
    data.train.set_epoch(2)
    full = [x for x, _ in data.train]
    skipped = sorted(data.train.skipped)
    assert len(skipped) == 2 and "broken.png" in skipped[0] and "truncated.jpg" in skipped[1]
    assert "reslab: skipping" in capsys.readouterr().err
    data.train.set_epoch(2, start_sample=8)  # resumed two batches into the epoch
    tail = [x for x, _ in data.train]
    assert all(torch.equal(p, q) for p, q in zip(full[-len(tail) :], tail, strict=True))
    data.train.set_epoch(3)
    assert not torch.equal(next(iter(data.train))[0], full[0])  # a new epoch, new crops
    assert sum(len(y) for _, y in data.eval) == 18  # every readable test image, grey ones as RGB


def test_predict_and_embed_use_the_batched_path_when_asked(tmp_path) -> None:
    from reslab.data import default_preprocess, image_loader

    root = write_folder(tmp_path / "imgs", size=(60, 80), per_class=2, fmt="jpg", splits=("test",))
    files = sorted((root / "test").rglob("*.jpg"))
    pre = default_preprocess("resnet50", 3)
    with pytest.warns(UserWarning, match="decode=gpu without a CUDA device"):
        batched = image_loader(files, pre, batch_size=4, workers=0, decode="gpu")
    assert isinstance(batched, BatchDecodeLoader)
    pil = image_loader(files, pre, batch_size=4, workers=0, decode="cpu")
    a, b = torch.cat([x for x, _ in pil]), torch.cat([x for x, _ in batched])
    assert a.shape == b.shape == (6, 3, 224, 224)
    assert (a - b).abs().max() <= 1.01 / (255 * min(pre.std))  # within a grey level, after normalisation
    with pytest.warns(UserWarning, match="resizes whole images"):  # 32x32 models: no batched geometry
        assert isinstance(image_loader(files, default_preprocess("resnet20", 3), decode="gpu"), FolderLoader)


def test_training_and_evaluation_crops_cover_the_right_area() -> None:
    """A sanity check of the geometry without PIL: the center crop of a constant-per-column image
    keeps the middle columns."""
    from reslab.data.decode import transform_batch

    ramp = torch.arange(500, dtype=torch.float32).expand(3, 375, 500).round().clamp(0, 255).to(torch.uint8)
    out = transform_batch([ramp], [0], train=False, size=224, resize=256)[0].float()
    _, rw = resized_size(375, 500, 256)
    left = round((rw - 224) / 2)
    expected = (torch.arange(left, left + 224) + 0.5) * 500 / rw - 0.5  # column centres mapped back
    assert math.isclose(out[0, 100, 100].item(), min(255.0, expected[100].item()), abs_tol=1.5)
