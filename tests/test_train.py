"""The training engine: it learns, resumes exactly, saves atomically and stops cleanly on bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import reslab.engine.train as train
from reslab import ReslabError
from reslab.cli import main
from reslab.config import ScheduleConfig, load_config
from reslab.engine import fit
from reslab.engine.schedule import lr_factor
from reslab.errors import NonFiniteLoss, TrainingInterrupted
from reslab.weights import read_file

# A small, fast configuration on the embedded MNIST sample.
TINY = {
    "data.limit_train": 320,
    "data.limit_test": 200,
    "data.batch_size": 32,
    "progress": False,
    "log_every": 4,
    "sched.name": "cosine",
    "optim.lr": 0.05,
    "device": "cpu",  # bitwise resume and fixed numbers: CPU arithmetic, also on GPU machines
}


def _cfg(tmp_path, name="run", **extra):
    return load_config(overrides={**TINY, "out": str(tmp_path / name), **extra})


def test_short_run_learns_and_writes_its_run_directory(tmp_path) -> None:
    # 1,000 real digits, 3 epochs: about 10% test error when measured; chance is 90%.
    learn = {"data.limit_train": 1000, "data.batch_size": 50, "optim.lr": 0.1, "sched.warmup_iters": 3}
    result = fit(_cfg(tmp_path, epochs=3, **learn))
    d = result.run_dir
    for name in (
        "config.yaml",
        "command.txt",
        "metrics.csv",
        "metrics.jsonl",
        "last.pt",
        "best.pt",
        "curves.png",
        "confusion.png",
        "summary.json",
    ):
        assert (d / name).exists(), name
    assert any((d / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 3 and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert result.eval_err < 0.5  # chance is 0.9
    summary = json.loads((d / "summary.json").read_text())
    assert summary["eval_err"] == pytest.approx(result.eval_err) and len(summary["per_class_acc"]) == 10
    assert (
        load_config(base=__import__("yaml").safe_load((d / "config.yaml").read_text())).data.limit_train
        == 1000
    )


def test_exact_resume_after_interrupt_mid_epoch(tmp_path, monkeypatch) -> None:
    # Drop-path and EMA make the model's own randomness and extra state part of the test.
    extra = {"epochs": 3, "model_args": {"drop_path_rate": 0.1}, "ema_decay": 0.9}
    reference = fit(_cfg(tmp_path, "straight", **extra))
    monkeypatch.setenv(train.SIGINT_AT, "15")  # a real SIGINT at iteration 15: epoch 2 of 3, mid-epoch
    with pytest.raises(TrainingInterrupted, match="resume with: reslab train --resume"):
        fit(_cfg(tmp_path, "cut", **extra))
    ckpt = read_file(tmp_path / "cut" / "last.pt")
    assert ckpt["state"]["iteration"] == 15 and ckpt["state"]["step"] == 5
    monkeypatch.undo()
    resumed = fit(resume=tmp_path / "cut", progress=False)
    a = read_file(reference.run_dir / "last.pt")
    b = read_file(resumed.run_dir / "last.pt")
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs after resume"
    assert resumed.eval_err == reference.eval_err
    # The resumed run's epoch rows are the uninterrupted run's.
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k not in ("img_s", "epoch_time_s")}  # noqa: E731
    assert [strip(r) for r in rows(reference.run_dir) if r["kind"] == "epoch"] == [
        strip(r) for r in rows(resumed.run_dir) if r["kind"] == "epoch"
    ]


def test_cli_sigint_then_resume(tmp_path) -> None:
    """A real Ctrl-C to the `reslab train` process at a known step: checkpoint, exit 130, exact resume
    (from the run's last.pt named directly)."""
    args = [sys.executable, "-m", "reslab", "train", "--no-progress", "--epochs", "2", "--out"]
    overrides = [f"{k}={v}" for k, v in TINY.items() if k != "progress"] + ["log_every=1"]
    ref = subprocess.run([*args, str(tmp_path / "ref"), *overrides], capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    env = {**os.environ, train.SIGINT_AT: "7"}
    cut = subprocess.run([*args, str(tmp_path / "cut"), *overrides], capture_output=True, text=True, env=env)
    assert cut.returncode == 130, cut.stderr
    assert "resume with: reslab train --resume" in cut.stderr and "Traceback" not in cut.stderr
    assert read_file(tmp_path / "cut" / "last.pt")["state"]["iteration"] == 7
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "reslab",
            "train",
            "--resume",
            str(tmp_path / "cut" / "last.pt"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    a, b = read_file(tmp_path / "ref" / "last.pt"), read_file(tmp_path / "cut" / "last.pt")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch) -> None:
    from reslab.weights import atomic_save

    path = tmp_path / "last.pt"
    atomic_save({"x": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        atomic_save({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(read_file(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch) -> None:
    cfg = _cfg(tmp_path, epochs=3)
    original = train.F.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, y, **kw):
        calls["n"] += 1
        loss = original(logits, y, **kw)
        return loss * float("nan") if calls["n"] > 15 and kw.get("reduction") != "sum" else loss

    monkeypatch.setattr(train.F, "cross_entropy", poisoned)
    with pytest.raises(NonFiniteLoss, match="last good checkpoint is kept"):
        fit(cfg)
    ckpt = read_file(tmp_path / "run" / "last.pt")
    assert ckpt["state"]["epoch"] == 1  # the end of epoch 1, before the loss went bad
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.dtype.is_floating_point)


def test_num_classes_mismatch_is_explained(tmp_path) -> None:
    with pytest.raises(ReslabError, match="num_classes=5 but the data has 10 classes"):
        fit(_cfg(tmp_path, epochs=1, model_args={"num_classes": 5}))


def test_small_batch_warns_about_batchnorm(tmp_path) -> None:
    with pytest.warns(UserWarning, match="BatchNorm"):
        fit(_cfg(tmp_path, iters=2, **{"data.batch_size": 8}))


def test_recipes_and_overrides() -> None:
    paper = load_config("cifar10_paper")
    assert (paper.iters, paper.data.batch_size, paper.optim.lr, paper.optim.weight_decay) == (
        64000,
        128,
        0.1,
        1e-4,
    )
    assert paper.sched.milestones == [0.5, 0.75] and paper.sched.warmup_iters == 0
    deep = load_config("recipes/cifar10_paper.yaml", {"model": "resnet110"})
    assert (deep.sched.warmup_iters, deep.sched.warmup_mode) == (400, "constant")
    assert load_config("cifar10_paper", {"optim.lr": 0.05, "data.val_split": 0.1}).data.val_split == 0.1
    for name in ("imagenet_paper", "imagenet_modern", "cifar10_fast", "mnist_quick"):
        load_config(name)
    with pytest.raises(ReslabError, match=r"unknown config key 'optim.lrr'; did you mean optim.lr\?"):
        load_config(overrides={"optim.lrr": 0.1})
    with pytest.raises(ReslabError, match="must be float"):
        load_config(overrides={"optim.lr": "fast"})
    with pytest.raises(ReslabError, match="choose one of"):
        load_config(overrides={"sched.name": "exp"})
    with pytest.raises(ReslabError, match="recipe 'nope' not found"):
        load_config("nope")


def test_paper_schedule() -> None:
    cfg = ScheduleConfig(name="multistep", milestones=[0.5, 0.75])
    assert [lr_factor(i, 64000, cfg) for i in (0, 31999, 32000, 47999, 48000, 63999)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    warm = ScheduleConfig(name="multistep", warmup_iters=400, warmup_mode="constant", warmup_factor=0.1)
    assert lr_factor(399, 64000, warm) == 0.1 and lr_factor(400, 64000, warm) == 1
    cos = ScheduleConfig(name="cosine", warmup_iters=10, warmup_factor=0.0)
    assert (
        lr_factor(0, 110, cos) == 0
        and lr_factor(10, 110, cos) == 1
        and lr_factor(110, 110, cos) == pytest.approx(0)
    )
    one = ScheduleConfig(name="onecycle", peak_at=0.25, min_lr_factor=0.04)
    peak = max(range(100), key=lambda i: lr_factor(i, 100, one))
    assert (
        peak == 25
        and lr_factor(0, 100, one) == pytest.approx(0.04)
        and math.isclose(lr_factor(25, 100, one), 1)
    )


def test_cli_train_eval_predict(tmp_path, capsys) -> None:
    overrides = [f"{k}={v}" for k, v in TINY.items()]
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "r"), *overrides]) == 0
    out = capsys.readouterr().out
    assert "done: test error" in out and "curves.png" in out
    assert main(["eval", "--checkpoint", str(tmp_path / "r" / "best.pt"), "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"top1_err", "top5_err", "per_class_acc", "confusion_png"} <= set(report) and report["n"] == 1000
    from PIL import Image

    from reslab.data.sources import load_embedded

    img = load_embedded()[1].images[0, 0].numpy()
    Image.fromarray(img).save(tmp_path / "digit.png")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(tmp_path / "r" / "best.pt"),
                str(tmp_path / "digit.png"),
                "--json",
                "--topk",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    pred = json.loads(capsys.readouterr().out)
    probs = [t["prob"] for t in pred[0]["top"]]
    assert (
        len(pred) == 1 and len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
    )
    # the same model on the same image, by hand: the checkpoint's preprocessing and a softmax
    from reslab.engine import read_checkpoint

    ckpt = read_checkpoint(tmp_path / "r" / "best.pt", device="cpu")
    x = (torch.from_numpy(img).float()[None, None] / 255 - ckpt.preprocess.mean[0]) / ckpt.preprocess.std[0]
    with torch.no_grad():
        expected = ckpt.model(x).softmax(1)[0]
    assert probs[0] == pytest.approx(expected.max().item(), abs=1e-5)
    assert pred[0]["top"][0]["index"] == expected.argmax().item()


def test_cli_train_errors(tmp_path) -> None:
    cases = [
        (["train", "--model", "resnet5", "--out", str(tmp_path / "a")], "unknown model 'resnet5'"),
        (
            ["train", "--data", "folder", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "b")],
            "no such folder",
        ),
        (["train", "optim.lrr=1"], "did you mean optim.lr"),
        (["train", "--resume", str(tmp_path / "c"), "--lr", "0.1"], "drop optim.lr"),
        (["train", "--resume", str(tmp_path / "c")], "no last.pt to resume from"),
        (["eval", "--checkpoint", str(tmp_path / "missing.pt")], "no such checkpoint file"),
    ]
    for args, needle in cases:
        proc = subprocess.run([sys.executable, "-m", "reslab", *args], capture_output=True, text=True)
        assert proc.returncode == 2, (args, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
