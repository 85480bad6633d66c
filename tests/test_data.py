"""Data: every format, the batched in-memory path, the streaming path, caches and bad data."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from reslab import ReslabError
from reslab.config import DataConfig
from reslab.data import Placement, TensorLoader, build_data, random_crop_flip
from reslab.data.sources import CIFAR10_CLASSES, load_cifar, load_embedded, load_mnist
from tests.conftest import shared_data
from tests.fakedata import write_cifar, write_folder, write_mnist


def test_embedded_default_is_real_balanced_mnist() -> None:
    train, test = load_embedded()
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert 25 < train.images.float().mean() < 40  # MNIST's mean intensity is ~33/255
    data = build_data(DataConfig(), progress=False)
    assert data.in_chans == 1 and data.eval_split == "test" and len(data.classes) == 10


def test_cifar_pickles(tmp_path) -> None:
    root = write_cifar(tmp_path)
    train, test = load_cifar(root)
    assert train.images.shape == (100, 3, 32, 32) and test.images.shape == (20, 3, 32, 32)
    assert train.classes == CIFAR10_CLASSES
    data = build_data(DataConfig(name="cifar10", dir=str(root), batch_size=16), progress=False)
    x, _ = next(iter(data.train))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32


def test_cifar_unpickler_refuses_code(tmp_path) -> None:
    root = write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(root / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": Evil()}, f)
    with pytest.raises(ReslabError, match=r"not a CIFAR batch file \(refusing to load posix.system"):
        load_cifar(root)


def test_mnist_idx(tmp_path) -> None:
    root = write_mnist(tmp_path)
    train, test = load_mnist(root)
    assert train.images.shape == (60, 1, 28, 28) and test.labels.shape == (20,)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    import gzip

    with gzip.open(path) as f:
        data = f.read()
    with gzip.open(path, "wb") as f:
        f.write(data[:1000])
    with pytest.raises(ReslabError, match="truncated"):
        load_mnist(root)
    with pytest.raises(ReslabError, match="--download"):
        load_mnist(tmp_path / "nothing")


def test_small_image_folder_is_decoded_once_and_cached(tmp_path, monkeypatch) -> None:
    root = write_folder(tmp_path / "imgs", corrupt_one=True, grey_one=True)
    cfg = DataConfig(name="folder", dir=str(root), batch_size=8, cache_dir=str(tmp_path / "cache"))
    data = build_data(cfg, progress=False)
    assert data.classes == ["cat", "dog", "fish"] and data.in_chans == 3
    assert data.train.num_samples == 24 and any("broken.png" in s for s in data.skipped)
    # Second build: served from the cache without decoding anything.
    import reslab.data.sources as sources

    monkeypatch.setattr(
        sources, "_decode", lambda job: (_ for _ in ()).throw(AssertionError("decoded again"))
    )
    assert build_data(cfg, progress=False).train.num_samples == 24
    monkeypatch.undo()
    # A changed folder invalidates the cache.
    (root / "train" / "cat" / "0000.png").rename(root / "train" / "cat" / "moved.png")
    (root / "train" / "cat" / "0003.png").unlink()
    assert build_data(cfg, progress=False).train.num_samples == 23


def test_large_image_folder_streams_with_skips(tmp_path) -> None:
    root = write_folder(
        tmp_path / "big", size=(80, 96), per_class=4, fmt="jpg", grey_one=True, corrupt_one=True
    )
    cfg = DataConfig(name="folder", dir=str(root), batch_size=4, eval_batch_size=5, image_size=48, workers=0)
    data = build_data(cfg, progress=False)
    assert data.preprocess.resize == 55 and data.preprocess.size == (48, 48) and data.in_chans == 3
    batches = list(data.train)
    assert all(x.shape[1:] == (3, 48, 48) for x, _ in batches)
    seen = sum(len(y) for x, y in data.eval)
    assert seen == 12 and len(data.eval.skipped) == 1  # the broken file is skipped, by name
    assert "broken.png: not an image file" in data.eval.skipped[0]


def test_streaming_order_is_independent_of_workers_and_resumable(tmp_path) -> None:
    root = write_folder(tmp_path / "big", size=(70, 70), per_class=4, fmt="png")
    batches = {}
    for workers in (0, 2):
        cfg = DataConfig(name="folder", dir=str(root), batch_size=3, image_size=32, workers=workers)
        loader = build_data(cfg, place=Placement(seed=5), progress=False).train
        loader.set_epoch(2)
        batches[workers] = [x for x, _ in loader]
        loader.set_epoch(2, start_sample=6)
        tail = [x for x, _ in loader]
        assert all(torch.equal(a, b) for a, b in zip(batches[workers][2:], tail, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2], strict=True))


def test_folder_errors(tmp_path) -> None:
    root = write_folder(tmp_path / "a", splits=("train",))
    with pytest.raises(ReslabError, match="no val/ or test/ folder; pass --val-split"):
        build_data(DataConfig(name="folder", dir=str(root), cache_dir=str(tmp_path / "c")), progress=False)
    data = build_data(
        DataConfig(name="folder", dir=str(root), val_split=0.25, cache_dir=str(tmp_path / "c")),
        progress=False,
    )
    assert data.eval_split == "val" and data.eval.num_samples == 6 and data.train.num_samples == 18
    (root / "train" / "empty").mkdir()
    with pytest.raises(ReslabError, match="empty: class folder has no images"):
        build_data(DataConfig(name="folder", dir=str(root), val_split=0.25), progress=False)
    with pytest.raises(ReslabError, match="no such folder"):
        build_data(DataConfig(name="folder", dir=str(tmp_path / "missing")), progress=False)


def test_class_subset_and_limits() -> None:
    cfg = DataConfig(classes=["3", "7"], limit_train=100)
    data = build_data(cfg, progress=False)
    assert data.classes == ["3", "7"] and data.train.num_samples == 100
    assert set(data.eval.labels.tolist()) == {0, 1} and data.eval.num_samples == 200


def test_channel_conversion() -> None:
    data = build_data(DataConfig(limit_train=50), channels=3, progress=False)
    x, _ = next(iter(data.eval))
    assert x.shape[1] == 3 and torch.equal(x[:, 0], x[:, 1])


def test_batched_crop_flip_matches_per_image_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, 2, True, g)
    g = torch.Generator().manual_seed(0)  # replay the offsets and flips one image at a time
    dy, dx = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    mirror = torch.rand(6, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        ref = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        assert torch.equal(out[i], ref.flip(2) if mirror[i] else ref)
    assert torch.equal(random_crop_flip(x, 0, False, g), x)


def test_tensor_loader_is_deterministic_and_resumable() -> None:
    imgs = torch.randint(0, 256, (100, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(100)
    loader = TensorLoader(
        imgs,
        labels,
        batch_size=16,
        train=True,
        mean=(0.5,),
        std=(0.25,),
        augment="crop_flip",
        place=Placement(seed=3),
    )
    loader.set_epoch(4)
    full = list(loader)
    assert len(full) == 6 and all(len(y) == 16 for _, y in full)
    loader.set_epoch(4, start_sample=64)
    tail = list(loader)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[4:], tail, strict=True)
    )
    loader.set_epoch(5)
    assert not torch.equal(next(iter(loader))[1], full[0][1])  # a new epoch, a new order
    shards = [
        TensorLoader(
            imgs,
            labels,
            batch_size=7,
            train=False,
            mean=(0.5,),
            std=(0.25,),
            place=Placement(rank=r, world=3),
        )
        for r in range(3)
    ]
    seen = torch.cat([y for s in shards for _, y in s])
    assert sorted(seen.tolist()) == list(range(100))  # uneven shards, every sample once


def test_real_cifar10_folder_slice(tmp_path) -> None:
    src = shared_data("cifar10")
    for split in ("train", "test"):
        for c in CIFAR10_CLASSES:
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for f in sorted((src / split / c).iterdir())[:5]:
                (d / f.name).symlink_to(f)
    data = build_data(
        DataConfig(name="folder", dir=str(tmp_path), batch_size=10, cache_dir=str(tmp_path / "c")),
        progress=False,
    )
    assert (
        data.classes == CIFAR10_CLASSES and data.in_chans == 3 and data.train.images.shape[1:] == (3, 32, 32)
    )


def test_real_mnist() -> None:
    train, test = load_mnist(shared_data("mnist"))
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist()[:3] == [980, 1135, 1032]  # the official class counts
