"""The large-image pipeline: the geometry against torchvision's transforms, both decoding paths
(the batched one runs on the CPU here, with libjpeg-turbo instead of nvjpeg), skips, resume, the
background thread, and ``data.decode: auto``."""

from __future__ import annotations

import contextlib
import json
import threading
import warnings

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from reslab.config import DataConfig
from reslab.data import (
    BatchDecodeLoader,
    FolderLoader,
    Geometry,
    Placement,
    build_data,
    default_preprocess,
    image_loader,
    in_background,
)
from reslab.data import batched as batched_module
from reslab.data.batched import choose_decode, measure_paths
from reslab.data.decode import decode_bytes, load_image, random_resized_crop
from tests.conftest import shared_data
from tests.fakedata import write_folder

PIXELS = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)  # normalisation that leaves 0-255 values


def _photos(n: int) -> list:
    return sorted(shared_data("imagenet-samples").glob("*.JPEG"))[:n]


def _decoded(path) -> torch.Tensor:
    return decode_bytes(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))


def test_geometry_is_torchvisions_transforms_on_tensors() -> None:
    """Evaluation: Resize(256) + CenterCrop(224); training: RandomResizedCrop(224) + flip after
    torch.manual_seed(sample seed). Bitwise equal to torchvision's own v2 transforms."""
    evaluate = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])
    train = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])
    for seed, path in enumerate(_photos(6)):
        img = _decoded(path)
        assert torch.equal(Geometry((224, 224), 256)(img), evaluate(img)), path.name
        torch.manual_seed(seed)
        assert torch.equal(Geometry((224, 224), 256, train=True)(img, seed), train(img)), path.name
    small = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)  # 32x32 models resize whole images
    assert torch.equal(Geometry((32, 32))(small), v2.Resize([32, 32], antialias=True)(small))


def test_crops_and_flips_are_the_cpu_paths_draws() -> None:
    """Replaying torchvision's RandomResizedCrop and flip with a sample's seed gives its boxes,
    including the fallback for extreme aspect ratios."""
    rrc, flip = v2.RandomResizedCrop(224), v2.RandomHorizontalFlip()
    img = torch.zeros(3, 1, 1)
    for seed, (h, w) in enumerate([(375, 500), (500, 333), (40, 4000), (4000, 40), (224, 224)] * 20):
        torch.manual_seed(seed)
        params = rrc.make_params([v2.functional.resize(img, [h, w])])
        mirrored = not bool(torch.rand(1) >= flip.p)
        box = (params["top"], params["left"], params["height"], params["width"], mirrored)
        assert random_resized_crop(h, w, seed) == box


def test_cpu_path_is_within_a_grey_level_of_torchvisions_pil_transforms() -> None:
    """torchvision's classic ImageFolder preprocessing (PIL decode and resize) against the CPU path
    (libjpeg-turbo and torchvision's tensor resize): the same crop, rounding apart."""
    from torchvision import transforms as T

    files = _photos(24)
    pre = default_preprocess("resnet50", 3)
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    ours = torch.cat(
        [x for x, _ in image_loader(files, pre.replace(mean=(0.0,) * 3, std=(1 / 255,) * 3), 8, 0)]
    )
    theirs = []
    for f in files:
        with Image.open(f) as im:
            theirs.append(reference(im.convert("RGB")))
    diff = (ours.round() - torch.stack(theirs).float()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    # normalised as torchvision normalises (ToTensor + Normalize), a whole batch at once
    x, idx = next(iter(image_loader(files[:8], pre, batch_size=8, workers=0)))
    expected = T.Normalize(pre.mean, pre.std)(ours[idx] / 255)
    torch.testing.assert_close(x, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_both_paths_give_the_same_pixels_on_a_cpu(train: bool) -> None:
    """The same decoder (libjpeg-turbo) and the same geometry: bitwise the same batches, in the
    same order, with the same random crops."""
    samples = [(str(f), i) for i, f in enumerate(_photos(24))]
    geometry = Geometry((224, 224), 256, train)
    common = dict(batch_size=8, train=train, channels=3, workers=0, place=Placement(seed=7), **PIXELS)
    cpu = FolderLoader(samples, geometry, **common)
    batched = BatchDecodeLoader(samples, geometry, **common)
    a, b = list(cpu), list(batched)
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_draft_decoding_keeps_the_crop_and_decodes_fewer_pixels() -> None:
    """A training crop at least twice the output: the JPEG is decoded at reduced scale (other pixels
    than a full decode, so the draft path really ran) yet shows the same part of the photo."""
    path = _photos(1)[0]
    data = path.read_bytes()
    geometry = Geometry((64, 64), 73, train=True)
    with Image.open(path) as im:
        width, height = im.size
    boxes = {s: random_resized_crop(height, width, s) for s in range(100)}
    seed = next(s for s, box in boxes.items() if geometry.draft_size(height, width, box) is not None)
    full = load_image(data, geometry, seed, draft=False).float()
    draft = load_image(data, geometry, seed, draft=True).float()
    assert full.shape == draft.shape == (3, 64, 64)
    assert not torch.equal(full, draft) and (full - draft).abs().mean() < 4  # of 255 levels
    assert Geometry((64, 64), 73).draft_size(height, width, boxes[seed]) is None  # evaluation: never


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_skips_are_named_and_resume_is_exact(decode: str, tmp_path, capsys) -> None:
    root = write_folder(
        tmp_path / "imgs", size=(60, 80), per_class=6, fmt="jpg", corrupt_one=True, grey_one=True
    )
    (root / "train" / "dog" / "truncated.jpg").write_bytes(
        (root / "train" / "dog" / "0001.jpg").read_bytes()[:200]
    )
    cfg = DataConfig(name="folder", dir=str(root), batch_size=4, image_size=32, decode=decode, workers=0)
    warns = pytest.warns(UserWarning, match="decode=gpu without a CUDA device")
    with warns if decode == "gpu" else contextlib.nullcontext():
        data = build_data(cfg, place=Placement(seed=3), progress=False)
    assert data.decode == decode and type(data.train) is (
        BatchDecodeLoader if decode == "gpu" else FolderLoader
    )
    data.train.set_epoch(2)
    full = [x for x, _ in data.train]
    skipped = sorted(data.train.skipped)
    assert len(skipped) == 2 and "broken.png: not an image file" in skipped[0]
    assert "truncated.jpg: not a readable JPEG" in skipped[1]
    assert "reslab: skipping" in capsys.readouterr().err
    data.train.set_epoch(2, start_sample=8)  # resumed two batches into the epoch
    tail = [x for x, _ in data.train]
    assert all(torch.equal(p, q) for p, q in zip(full[-len(tail) :], tail, strict=True))
    data.train.set_epoch(3)
    assert not torch.equal(next(iter(data.train))[0], full[0])  # a new epoch, new crops
    assert sum(len(y) for _, y in data.eval) == 18  # every readable test image, grey ones as RGB


def test_predict_and_embed_use_the_batched_path_when_asked(tmp_path) -> None:
    root = write_folder(tmp_path / "imgs", size=(60, 80), per_class=2, fmt="jpg", splits=("test",))
    files = sorted((root / "test").rglob("*.jpg"))
    pre = default_preprocess("resnet50", 3)
    with pytest.warns(UserWarning, match="decode=gpu without a CUDA device"):
        batched = image_loader(files, pre, batch_size=4, workers=0, decode="gpu")
    assert isinstance(batched, BatchDecodeLoader)
    pil = image_loader(files, pre, batch_size=4, workers=0, decode="cpu")
    assert isinstance(pil, FolderLoader)
    a, b = torch.cat([x for x, _ in pil]), torch.cat([x for x, _ in batched])
    assert a.shape == (6, 3, 224, 224) and torch.equal(a, b)


def test_auto_decodes_on_the_cpu_without_cuda_and_follows_the_measurement_on_cuda(monkeypatch) -> None:
    samples = [(str(f), 0) for f in _photos(8)]
    geometry = Geometry((64, 64), 73, train=True)
    cpu = torch.device("cpu")
    assert choose_decode("auto", cpu, samples * 10, geometry, 3, 2) == (
        "cpu",
        {"chosen": "auto: no CUDA device"},
    )
    rates = measure_paths(samples, geometry, 3, cpu, workers=2)  # both paths, measured for real
    assert set(rates) == {"cpu", "gpu"} and all(r > 0 for r in rates.values())
    # On CUDA auto runs whichever path measured faster there (the measurement is replaced: no GPU here).
    monkeypatch.setattr(batched_module, "gpu_decoder_works", lambda device: True)
    cuda = torch.device("cuda")
    for measured, expected in (
        ({"cpu": 7400.0, "gpu": 11000.0}, "gpu"),
        ({"cpu": 7400.0, "gpu": 2400.0}, "cpu"),
    ):
        monkeypatch.setattr(batched_module, "measure_paths", lambda *a, m=measured, **k: m)
        chosen, how = choose_decode("auto", cuda, samples * 10, geometry, 3, 16)
        assert chosen == expected and how["img_s"] == measured
    assert choose_decode("auto", cuda, samples, geometry, 3, 16)[0] == "cpu"  # 8 files: not worth measuring


def test_background_thread_runs_ahead_keeps_order_and_stops() -> None:
    produced, second_made = [], threading.Event()

    def source():
        for i in range(6):
            produced.append(i)
            if i == 2:
                second_made.set()
            yield torch.tensor([i])

    it = in_background(source(), torch.device("cpu"), depth=2)
    assert next(it).item() == 0
    # While the consumer holds item 0 (a training step), the thread prepares the next ones.
    assert second_made.wait(timeout=30)
    assert [t.item() for t in it] == [1, 2, 3, 4, 5] and produced == list(range(6))

    def failing():
        yield torch.tensor([0])
        raise RuntimeError("decoder broke")

    with pytest.raises(RuntimeError, match="decoder broke"):
        list(in_background(failing(), torch.device("cpu")))

    def endless():
        i = 0
        while True:
            yield torch.tensor([i])
            i += 1

    it = in_background(endless(), torch.device("cpu"))
    next(it)
    it.close()  # the consumer stops early (e.g. the budget ends mid-epoch): the thread ends too
    assert not any(t.name == "reslab-batches" and t.is_alive() for t in threading.enumerate())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: nvjpeg and the measured auto choice")
def test_on_cuda_nvjpeg_is_close_to_the_cpu_path_and_auto_measures() -> None:
    files = _photos(64)
    samples = [(str(f), i) for i, f in enumerate(files)]
    geometry = Geometry((224, 224), 256)
    cuda = torch.device("cuda")
    common = dict(batch_size=32, train=False, channels=3, workers=2, place=Placement(cuda), **PIXELS)
    a = torch.cat([x for x, _ in FolderLoader(samples, geometry, **common)])
    b = torch.cat([x for x, _ in BatchDecodeLoader(samples, geometry, **common)])
    diff = (a - b).abs()
    assert a.shape == b.shape == (64, 3, 224, 224) and diff.mean() < 1.0  # nvjpeg is not libjpeg-turbo
    chosen, how = choose_decode("auto", cuda, samples, geometry, 3, 4)
    assert how["chosen"] == "auto: measured" and chosen == max(how["img_s"], key=how["img_s"].get)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_the_chosen_path_is_recorded_and_a_resumed_run_keeps_it(decode, tmp_path, monkeypatch) -> None:
    """config.yaml and summary.json say which path decoded the images; a run interrupted mid-epoch
    resumes on that path and ends with the weights of the uninterrupted run."""
    import yaml

    import reslab.engine.train as train
    from reslab.config import load_config
    from reslab.engine import fit
    from reslab.errors import TrainingInterrupted
    from reslab.weights import read_file

    root = write_folder(tmp_path / "photos", size=(40, 48), per_class=8, fmt="jpg")
    overrides = {
        "device": "cpu",
        "data.name": "folder",
        "data.dir": str(root),
        "data.in_memory": "no",
        "data.image_size": 32,
        "data.workers": 0,
        "data.batch_size": 4,
        "data.decode": decode,
        "epochs": 2,
        "progress": False,
        "log_every": 2,
    }
    quiet = warnings_ignored if decode == "gpu" else contextlib.nullcontext
    with quiet():
        reference = fit(load_config(overrides={**overrides, "out": str(tmp_path / "ref")}))
        monkeypatch.setenv(train.SIGINT_AT, "9")
        with pytest.raises(TrainingInterrupted):
            fit(load_config(overrides={**overrides, "out": str(tmp_path / "cut")}))
        monkeypatch.undo()
        resumed = fit(resume=tmp_path / "cut", progress=False)
    for run in (reference.run_dir, resumed.run_dir):
        assert yaml.safe_load((run / "config.yaml").read_text())["data"]["decode"] == decode
        assert json.loads((run / "summary.json").read_text())["decode"] == decode
    a, b = read_file(reference.run_dir / "last.pt"), read_file(resumed.run_dir / "last.pt")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


@contextlib.contextmanager
def warnings_ignored():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # decode=gpu without CUDA, said once per loader
        yield


def test_the_pipeline_benchmark_runs_on_a_cpu_with_fewer_photos_than_a_batch() -> None:
    """benchmarks/jpeg_pipeline.py with 8 photos and tiny settings: every stage and rate reported,
    fed_fraction the ratio it claims to be."""
    import subprocess
    import sys
    from pathlib import Path

    shared_data("imagenet-samples")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "jpeg_pipeline.py"
    args = ["--device", "cpu", "--limit", "8", "--size", "32", "--batch", "16", "--workers", "1"]
    args += ["--batches-per-worker", "2", "--model", "resnet20", "--decode", "cpu,gpu"]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["decode"] == "cpu" and set(result["paths"]) == {"cpu", "gpu"}
    for row in result["paths"].values():
        assert set(row["stages_ms"]) >= {"read", "decode", "crop_resize", "normalise_copy"}
        assert row["fed_fraction"] == pytest.approx(row["train_img_s"] / result["synthetic_img_s"])
        assert row["vs_torchvision"]["train"] == pytest.approx(
            row["loader_img_s"]["train"] / result["torchvision_loader_img_s"]["train"]
        )
