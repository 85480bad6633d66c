"""Nothing lost, nothing stale, nothing silently wrong: one test per class of what a new user hit,
each with examples from the report and one of our own. Everything on the CPU, at toy scale."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from reslab.cli import main
from reslab.config import load_config
from reslab.engine.checkpoint import read_run_checkpoint
from reslab.weights import atomic_save, file_kind, read_file
from tests.fakedata import write_folder

CPU = ["--device", "cpu"]
TINY = ["data.limit_train=64", "data.limit_test=40", "data.batch_size=32", "log_every=1", "device=cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny trained run on the embedded digits."""
    out = tmp_path_factory.mktemp("nothing-lost") / "run"
    assert main(["train", "--iters", "2", "--no-progress", "--out", str(out), *TINY]) == 0
    return out


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("reslab: error:") == 1 and "Traceback" not in err, err
    return err


def test_no_command_writes_over_its_inputs_or_over_another_kind_of_file(run, tmp_path, capsys) -> None:
    ckpt = run / "last.pt"
    before = ckpt.read_bytes()
    for fmt in ("onnx", "torchscript"):  # from the report
        assert main(["export", "--checkpoint", str(ckpt), "--format", fmt, "--out", str(ckpt)]) == 2
        assert "is an input of this command" in _err(capsys)
    assert main(["quantize", "--checkpoint", str(ckpt), "--out", str(ckpt)]) == 2
    assert "is an input of this command" in _err(capsys)
    assert ckpt.read_bytes() == before and file_kind(ckpt) == "PyTorch checkpoint"
    # our own: another run's checkpoint is not an input, but an export does not replace it either
    other = tmp_path / "other.pt"
    shutil.copy(ckpt, other)
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(other)]) == 2
    assert "holds a PyTorch checkpoint, not a ONNX model; choose another --out, or pass --overwrite" in _err(
        capsys
    )
    shutil.copy(ckpt, tmp_path / "index.npy")  # a checkpoint under an index's name
    assert main(["embed", "--checkpoint", str(ckpt), str(run), "--out", str(tmp_path / "index.npy")]) == 2
    assert "holds a PyTorch checkpoint, not a NumPy array" in _err(capsys)
    # re-running an export over its own earlier output is fine; --overwrite replaces another kind
    out = tmp_path / "m.onnx"
    for _ in range(2):
        assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    assert (
        main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(other), "--overwrite"])
        == 0
    )
    assert file_kind(other) == "ONNX model"


def test_a_failed_verification_leaves_what_was_there(run, tmp_path, monkeypatch) -> None:
    import reslab.deploy.export as export
    from reslab.deploy import real_inputs
    from reslab.engine import read_checkpoint
    from reslab.errors import ReslabError

    ckpt = read_checkpoint(run / "last.pt", device="cpu")
    out = tmp_path / "m.onnx"
    export.export_model(ckpt, "onnx", out, verify_inputs=real_inputs(ckpt, None, 4))
    good = out.read_bytes()
    original = export.run_exported
    monkeypatch.setattr(export, "run_exported", lambda *a: original(*a) + 1.0)
    with pytest.raises(ReslabError, match=r"verification failed.*nothing was written"):
        export.export_model(ckpt, "onnx", out, fold_bn=True, verify_inputs=real_inputs(ckpt, None, 4))
    assert out.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == [
        "m.onnx",
        "m.onnx.json",
    ]


def test_studies_reuse_only_what_the_same_inputs_computed(run, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    a = tmp_path / "a.pt"
    b = tmp_path / "b.pt"
    shutil.copy(run / "last.pt", a)
    assert main(["train", "--iters", "3", "--no-progress", "--out", str(tmp_path / "r2"), *TINY]) == 0
    shutil.copy(tmp_path / "r2" / "last.pt", b)
    base = ["analyze", "landscape", "--grid", "3", "--samples", "16", "--mode", "1d", "--no-progress", *CPU]
    # the report: A then B with the default --out gave B's report A's numbers; now each has its own
    assert main([*base, "--checkpoint", str(a)]) == 0
    assert main([*base, "--checkpoint", str(b)]) == 0
    folders = sorted((tmp_path / "runs").glob("analyze-landscape-*"))
    assert len(folders) == 2
    losses = {
        json.loads((f / "summary.json").read_text())["checkpoints"][0]["loss_at_minimum"] for f in folders
    }
    assert len(losses) == 2  # two checkpoints, two answers
    # the same --out with another checkpoint, or another --samples: refused, nothing replaced
    study_of_a = next(f for f in folders if str(a) in (f / "study.json").read_text())
    out = ["--out", str(study_of_a)]
    capsys.readouterr()
    assert main([*base, "--checkpoint", str(b), *out]) == 2
    assert "holds a landscape study of other inputs (checkpoints differ)" in _err(capsys)
    other_samples = [*base, "--samples", "32", "--checkpoint", str(a), *out]  # the last --samples wins
    assert main(other_samples) == 2
    assert "(samples differ)" in _err(capsys)
    # degradation rerun with another --iters in the same folder: refused instead of reused
    deg = [
        "analyze",
        "degradation",
        "--depths",
        "20",
        "--quick",
        "--no-progress",
        *CPU,
        "--out",
        str(tmp_path / "d"),
    ]
    deg += ["--batch-size", "16"]
    assert main([*deg, "--iters", "2"]) == 0
    capsys.readouterr()
    assert main([*deg, "--iters", "2"]) == 0  # the same study: its runs are reused, and it says so
    assert "reusing 2 finished run(s) of this study: plain20, resnet20" in capsys.readouterr().err
    assert main([*deg, "--iters", "3"]) == 2
    assert "(iters differ)" in _err(capsys)
    # our own: the same weights under another name are the same input
    shutil.copy(a, tmp_path / "a-copy.pt")
    assert main([*base, "--checkpoint", str(tmp_path / "a-copy.pt"), "--out", str(tmp_path / "l")]) == 0
    assert main([*base, "--checkpoint", str(tmp_path / "a-copy.pt"), "--out", str(tmp_path / "l")]) == 0


def test_numbers_are_read_as_python_reads_them(tmp_path, capsys) -> None:
    assert load_config(overrides={"optim.lr": "1e-3"}).optim.lr == 0.001  # --lr 1e-3 and optim.lr=1e-3
    assert load_config(overrides={"optim.lr": "1e6"}).optim.lr == 1e6
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "optim:\n  lr: 1e-3\n  weight_decay: 5E-4\niters: 1_000\n"
    )  # YAML 1.1 reads these as strings
    cfg = load_config(str(recipe))
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.iters) == (0.001, 0.0005, 1000)
    assert (
        main(["train", "--lr", "1e-3", "--iters", "1", "--no-progress", "--out", str(tmp_path / "r"), *TINY])
        == 0
    )
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["optim"]["lr"] == 0.001
    assert main(["train", "--lr", "fast", "--out", str(tmp_path / "x")]) == 2
    assert "optim.lr" in _err(capsys)


def test_runs_resume_and_evaluate_from_any_folder(tmp_path, monkeypatch, capsys) -> None:
    import reslab.engine.train as train

    root = write_folder(tmp_path / "work" / "tiny", size=(16, 16), per_class=16)
    monkeypatch.chdir(tmp_path / "work")
    args = ["train", "--data-dir", "tiny", "--iters", "4", "--no-progress", "--out", "my run", *TINY]
    monkeypatch.setenv(train.SIGINT_AT, "2")
    assert main(args) == 130
    assert "reslab train --resume 'my run'" in capsys.readouterr().err  # quoted: a path with a space
    monkeypatch.delenv(train.SIGINT_AT)
    run = tmp_path / "work" / "my run"
    assert read_run_checkpoint(run / "last.pt").config["data"]["dir"] == str(root.resolve())
    monkeypatch.chdir(tmp_path)  # elsewhere
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--json", *CPU]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 48
    # the data moves: the same data elsewhere is accepted, other data is not
    moved = shutil.move(str(root), str(tmp_path / "moved"))
    assert main(["train", "--resume", str(run), "--iters", "6", "--no-progress"]) == 2
    assert "no such folder" in _err(capsys)
    assert main(["train", "--resume", str(run), "--iters", "6", "--data-dir", moved, "--no-progress"]) == 0
    (Path(moved) / "train" / "cat" / "0000.png").unlink()
    assert main(["train", "--resume", str(run), "--iters", "8", "--data-dir", moved, "--no-progress"]) == 2
    assert "is not the data" in _err(capsys)


def test_non_finite_numbers_stop_runs_and_are_never_reported_as_results(run, tmp_path, capsys) -> None:
    out = tmp_path / "huge-lr"
    assert main(["train", "--iters", "4", "--no-progress", "--out", str(out), "optim.lr=1e6", *TINY]) == 2
    err = _err(capsys)
    assert ("loss became nan" in err or "no longer finite" in err) and not (out / "best.pt").exists()
    # a checkpoint whose weights produce NaN: eval and predict refuse in one line, exit 2
    broken = read_file(run / "last.pt")
    broken["model"]["fc.weight"][:] = float("nan")
    atomic_save(broken, tmp_path / "nan.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "nan.pt"), "--json", *CPU]) == 2
    assert "outputs are not finite" in _err(capsys)
    digits = write_folder(tmp_path / "digits", size=(28, 28), per_class=2, splits=("test",))
    assert main(["predict", "--checkpoint", str(tmp_path / "nan.pt"), str(digits), *CPU]) == 2
    assert "outputs are not finite" in _err(capsys)
    # our own: summary.json is strict JSON (no best error yet is null, not Infinity)
    text = (run / "summary.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))


def test_data_that_does_not_fit_the_model_is_refused(run, tmp_path, capsys) -> None:
    from reslab import ReslabError, create_model

    root = write_folder(tmp_path / "shapes", size=(16, 16), per_class=16)
    base = ["train", "--data-dir", str(root), "--iters", "2", "--no-progress", *TINY]
    assert main([*base, "--out", str(tmp_path / "s")]) == 0
    renamed = tmp_path / "renamed"
    shutil.copytree(root, renamed)
    for split in ("train", "test"):
        os.rename(renamed / split / "dog", renamed / split / "wolf")
    ckpt = str(tmp_path / "s" / "last.pt")
    assert main(["eval", "--checkpoint", ckpt, "--data-dir", str(renamed), *CPU]) == 2
    assert "classes are not the checkpoint's (2 differ" in _err(capsys)  # sorted: cat, fish, wolf
    assert main(["eval", "--checkpoint", ckpt, "--data-dir", str(renamed), "--classes-by-index", *CPU]) == 0
    assert main([*base, "data.image_size=64", "data.in_memory=yes", "--out", str(tmp_path / "big")]) == 2
    assert "decoded into memory at their own size" in _err(capsys)
    for bad in ({"drop_path_rate": 2.0}, {"output_stride": 7}, {"num_classes": -1}):
        with pytest.raises(ReslabError, match="model option out of range"):
            create_model("resnet20", **bad)
    for name in ("resnet20", "resnet56", "wrn16_2"):  # what the small-batch warning recommends now builds
        assert create_model(name, norm_layer="group")(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # our own: a video model given images says so before any forward pass
    clip = tmp_path / "clip.pt"
    from reslab import save_weights

    save_weights(create_model("r3d_18", num_classes=3), clip)
    assert main(["predict", "--checkpoint", str(clip), str(root / "test"), *CPU]) == 2
    assert "model of video clips, given images" in _err(capsys)


def test_odd_requests_get_one_line_and_change_nothing(run, tmp_path, capsys) -> None:
    ckpt = str(run / "last.pt")
    land = [
        "analyze",
        "landscape",
        "--checkpoint",
        ckpt,
        "--samples",
        "8",
        *CPU,
        "--out",
        str(tmp_path / "l"),
    ]
    for grid in ("2", "1", "4"):
        assert main([*land, "--grid", grid]) == 2
        _err(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "zero.jpg").write_bytes(b"")
    (empty / "notes.txt").write_text("not an image")
    for target in ([str(empty / "zero.jpg")], [str(empty / "notes.txt")], [str(empty)]):
        assert main(["predict", "--checkpoint", ckpt, *target, *CPU]) == 2
        assert "no readable image among the files given (1 skipped" in _err(capsys)
    assert main(["embed", "--checkpoint", ckpt, str(empty), "--out", str(tmp_path / "i.npy"), *CPU]) == 2
    _err(capsys)
    summary = (run / "summary.json").read_text()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2  # finished: nothing to resume
    assert "has finished" in _err(capsys) and (run / "summary.json").read_text() == summary
    # our own: resuming from best.pt of a run that went on would rewind it and replace last.pt
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    state = read_file(cut / "last.pt")
    state["state"]["iteration"] += 1
    atomic_save(state, cut / "last.pt")
    last = (cut / "last.pt").read_bytes()
    assert main(["train", "--resume", str(cut / "best.pt"), "--no-progress"]) == 2
    assert "would rewind the run" in _err(capsys) and (cut / "last.pt").read_bytes() == last


def test_messages_and_numbers_say_what_is_true(run, tmp_path, capsys) -> None:
    from reslab.data import build_data
    from reslab.deploy.bench import bench

    cfg = load_config(overrides={"data.limit_test": 10, "data.limit_train": 7})
    data = build_data(cfg.data, progress=False)
    assert (data.eval.num_samples, data.train.num_samples) == (10, 10)  # 7 asked, but every digit kept
    result = bench(
        "resnet20", batches=(1,), backends=("reslab", "reslab-cl-fold"), min_time=0.05, device="cpu"
    )
    assert all(0 < r["peak_fraction"] <= 1 for r in result["rows"])
    capsys.readouterr()
    assert main(["models", "resnet20"]) == 0
    out = capsys.readouterr().out
    assert "GMACs" in out and "GFLOPs" not in out
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--precision", "tf32", *CPU]) == 0
    assert "reslab: precision fp32 (tf32 asked: no TF32 off CUDA)" in capsys.readouterr().err
    assert main(["analyze", "degradation", "--help"]) == 0
    assert "checkpoint" not in capsys.readouterr().out  # it trains its own networks
