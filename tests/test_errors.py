"""No rough edges: each class of bad input is tested as a class, generated from where it is declared
(config annotations, every command's options), so that a new member of a class is caught too."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch

from reslab.cli import build_parser, main
from reslab.cli.options import COMMANDS
from reslab.config import Pattern, Range, TrainConfig, key_type, load_config
from reslab.errors import ReslabError
from tests.fakedata import write_folder

TINY = ["data.limit_train=64", "data.limit_test=32", "data.batch_size=32", "log_every=1", "device=cpu"]


def train_one_step(root, out, *extra: str) -> int:
    """`reslab train` for one step on a folder of images (exit code)."""
    return main(
        ["train", "--data-dir", str(root), "--iters", "1", "--no-progress", "--out", str(out), *TINY, *extra]
    )


def _violation(c: Range) -> float:
    """A value just outside ``c``."""
    if c.gt is not None:
        return c.gt
    if c.ge is not None:
        return c.ge - 1
    return c.lt if c.lt is not None else c.le + 1


def _range_keys(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, Range]]:
    """Every config key whose annotation carries a numeric range (lists: their items)."""
    out = []
    for f in dataclasses.fields(cls):
        tp = key_type(f.name, cls)
        if dataclasses.is_dataclass(tp):
            out += _range_keys(tp, f"{prefix}{f.name}.")
            continue
        stack = [tp]
        while stack:
            t = stack.pop()
            meta = [m for m in getattr(t, "__metadata__", ()) if isinstance(m, Range)]
            if meta:
                out.append((prefix + f.name, meta[0]))
                break
            stack += typing.get_args(t)
    return out


RANGE_KEYS = _range_keys()


def test_every_ranged_key_is_found() -> None:
    keys = {k for k, _ in RANGE_KEYS}
    assert {"epochs", "iters", "data.batch_size", "optim.lr", "sched.milestones", "optim.betas"} <= keys


@pytest.mark.parametrize(("key", "constraint"), RANGE_KEYS, ids=[k for k, _ in RANGE_KEYS])
def test_every_out_of_range_config_value_is_refused_naming_the_key(key: str, constraint: Range) -> None:
    bad = _violation(constraint)
    tp = key_type(key)
    if typing.get_origin(tp) not in (list, tuple):  # an optional list: the list inside
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    container = typing.get_origin(tp)
    value = [bad] if container is list else [bad, 0.5] if container is tuple else bad
    with pytest.raises(ReslabError, match=rf"^{key}=.*must be"):
        load_config(overrides={key: value})


def test_zero_is_a_value_not_unset() -> None:
    for key in ("epochs", "iters", "data.batch_size", "data.limit_train", "data.image_size"):
        with pytest.raises(ReslabError, match=rf"^{key}=0"):
            load_config(overrides={key: 0})
    assert load_config(overrides={"epochs": None}).epochs is None  # None is "not set"


def test_choices_accept_yaml_booleans_and_refuse_the_rest() -> None:
    assert load_config(overrides={"data.in_memory": False}).data.in_memory == "no"  # YAML reads `no` as false
    assert load_config(overrides={"data.in_memory": True}).data.in_memory == "yes"
    with pytest.raises(ReslabError, match=r"data.in_memory='maybe': choose one of auto, yes, no"):
        load_config(overrides={"data.in_memory": "maybe"})
    with pytest.raises(ReslabError, match="device='gpu': must be auto, cpu, cuda"):
        load_config(overrides={"device": "gpu"})


def test_yaml_syntax_error_names_the_line(tmp_path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: resnet20\noptim:\n  lr: [0.1\n")
    with pytest.raises(ReslabError, match=r"bad.yaml: line \d+, column \d+: not valid YAML"):
        load_config(str(recipe))


def _option_probes() -> list[tuple[str, list[str], str, str]]:
    """(command, argv prefix, flag, bad value) for every option of every command whose type checks a
    range, and every flag bound to a ranged config key."""
    probes = []
    ranged = dict(RANGE_KEYS)
    for name, _, _ in COMMANDS:
        parser = build_parser(name)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        parsers = [([name], sub)]
        for a in sub._actions:
            if isinstance(a, argparse._SubParsersAction):  # analyze's studies
                parsers += [([name, study], p) for study, p in a.choices.items()]
        for argv, p in parsers:
            for action in p._actions:
                if not action.option_strings:
                    continue
                flag = action.option_strings[-1]
                constraint = getattr(action.type, "constraint", None)
                key = action.dest.partition(":")[2] if action.dest.startswith("train:") else None
                if isinstance(constraint, Range):
                    probes.append((name, argv, flag, str(int(_violation(constraint)))))
                elif key in ranged and name == "train":
                    probes.append((name, argv, flag, str(_violation(ranged[key]))))
    return probes


PROBES = _option_probes()


def test_probes_cover_the_commands() -> None:
    covered = {(tuple(argv), flag) for _, argv, flag, _ in PROBES}
    expected = [
        (("train",), "--epochs"),
        (("train",), "--batch-size"),
        (("predict",), "--topk"),
        (("bench",), "--input-size"),
        (("quantize",), "--calib-n"),
        (("analyze", "landscape"), "--grid"),
        (("analyze", "degradation"), "--iters"),
        (("analyze", "lesion"), "--draws"),
    ]
    assert set(expected) <= covered


@pytest.mark.parametrize(
    ("command", "argv", "flag", "bad"), PROBES, ids=[f"{' '.join(p[1])} {p[2]}" for p in PROBES]
)
def test_every_bounded_option_refuses_out_of_range_values_in_one_line(
    capsys, command, argv, flag, bad
) -> None:
    code = main([*argv, flag, bad])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("reslab: error:"), err
    assert "must be" in err and "Traceback" not in err


def test_a_data_folder_implies_folder_on_every_command(tmp_path, capsys) -> None:
    root = write_folder(tmp_path / "imgs", size=(16, 16), per_class=16)
    out = tmp_path / "r"
    assert train_one_step(root, out) == 0
    assert json.loads((out / "summary.json").read_text())["data"] == "folder"
    capsys.readouterr()
    # a checkpoint trained on the embedded digits, evaluated on a folder given alone
    mnist = tmp_path / "m"
    assert main(["train", "--iters", "1", "--no-progress", "--out", str(mnist), *TINY]) == 0
    capsys.readouterr()
    code = main(["eval", "--checkpoint", str(mnist / "last.pt"), "--data-dir", str(root), "--json"])
    assert code == 2 and "predicts 10 classes but folder has 3" in capsys.readouterr().err


def test_suggested_fixes_work(tmp_path, capsys) -> None:
    """Each error that suggests a command names one that then runs: a study on a bare state dict
    first asks for --model, then for the data."""
    from reslab import create_model

    bare = tmp_path / "weights.pt"
    torch.save(create_model("resnet20").state_dict(), bare)
    base = ["analyze", "responses", "--checkpoint", str(bare), "--limit", "20", "--out", str(tmp_path / "s")]
    assert main(base) == 2
    assert "pass --model NAME" in capsys.readouterr().err
    assert main([*base, "--model", "resnet20"]) == 2
    assert "pass --data (and --data-dir)" in capsys.readouterr().err
    assert main([*base, "--model", "resnet20", "--data", "default"]) == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["checkpoints"][0]["images"] == 20  # two of each digit
    # resuming a finished or interrupted run: the folder or its last.pt, as the message says
    run = tmp_path / "run"
    assert main(["train", "--iters", "1", "--no-progress", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--iters", "1", "--no-progress", "--out", str(run), *TINY]) == 2
    assert f"finished run; train it on with --resume {run} --iters N" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--iters", "2", "--no-progress"]) == 0


def test_files_that_are_not_checkpoints_are_named_as_such(tmp_path, capsys) -> None:
    from reslab import create_model

    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save(create_model("resnet20"), tmp_path / "whole.pt")
    torch.save(create_model("resnet20").state_dict(), tmp_path / "sd.pt")
    data = (tmp_path / "sd.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    expected = {
        "random.pt": "not a checkpoint (neither a PyTorch file nor safetensors)",
        "whole.pt": "holds pickled Python objects",
        "cut.pt": "not a readable checkpoint (truncated or corrupt?)",
        "missing.pt": "no such checkpoint file",
    }
    for name, needle in expected.items():
        assert main(["eval", "--checkpoint", str(tmp_path / name), "--model", "resnet20"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and name in err, err


def test_unknown_devices_and_models_fail_in_one_line(capsys) -> None:
    for argv, needle in (
        (["bench", "resnet20", "--device", "gpu"], "--device 'gpu': use auto, cpu, cuda"),
        (["train", "--device", "tpu:0"], "device='tpu:0': must be auto, cpu, cuda"),
        (["info", "resnet38"], "CIFAR ResNets have 6n+2 layers"),
        (["info", "wrn16_0"], "the widening factor k must be at least 1"),
        (["bench", "resnet20", "--backends", "torchvision"], "torchvision has no resnet20"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (argv, err)
    assert main(["info", "RESNET50"]) == 0 and "resnet50:" in capsys.readouterr().out  # names in any case


def test_data_and_model_must_fit_before_the_first_step(tmp_path, capsys) -> None:
    root = write_folder(tmp_path / "imgs", size=(16, 16), per_class=16)
    code = main(
        ["train", "--model", "r3d_18", "--data-dir", str(root), "--iters", "1", "--out", str(tmp_path / "v")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "r3d_18 reads video clips but data folder holds images" in err


def test_nan_in_the_first_epoch_says_no_checkpoint_exists(tmp_path, monkeypatch) -> None:
    import reslab.engine.train as train
    from reslab.engine import fit
    from reslab.errors import NonFiniteLoss

    original = train.F.cross_entropy
    monkeypatch.setattr(train.F, "cross_entropy", lambda *a, **k: original(*a, **k) * float("nan"))
    cfg = {
        "iters": 3,
        "progress": False,
        "out": str(tmp_path / "n"),
        "data.limit_train": 64,
        "data.batch_size": 32,
    }
    with pytest.raises(
        NonFiniteLoss, match=r"the loss became nan by iteration 1.*no checkpoint was written yet"
    ):
        fit(load_config(overrides=cfg))
    assert not (tmp_path / "n" / "last.pt").exists()


def test_pipes_closed_early_end_quietly(tmp_path) -> None:
    # The reader exits at once, so the table is written to a closed pipe.
    command = f"{sys.executable} -m reslab models 'resnet18*' | true; exit ${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_warnings_are_one_reslab_line(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "reslab", "train", "--iters", "1", "--batch-size", "8", "--no-progress",
         "--out", str(tmp_path / "w"), "data.limit_train=64", "data.limit_test=32"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if "BatchNorm" in x)
    assert line.startswith("reslab: warning: per-device batch 8 < 16") and ".py:" not in proc.stderr


def test_top5_only_with_more_than_five_classes(tmp_path, capsys) -> None:
    root = write_folder(tmp_path / "imgs", size=(16, 16), per_class=16)
    out = tmp_path / "r"
    assert train_one_step(root, out) == 0
    assert "top-5" not in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["eval_top5_err"] is None


def test_every_skipped_image_is_listed_in_the_run(tmp_path, capsys) -> None:
    root = write_folder(tmp_path / "imgs", size=(16, 16), per_class=16, corrupt_one=True)
    (root / "train" / "dog" / "empty.png").write_bytes(b"")
    out = tmp_path / "r"
    assert train_one_step(root, out, f"data.cache_dir={tmp_path / 'c'}") == 0
    listed = (out / "skipped.txt").read_text().splitlines()
    assert len(listed) == 3 and any("empty.png" in s for s in listed)  # two broken.png and the empty file
    assert f"listed in {out / 'skipped.txt'}" in capsys.readouterr().err


def test_finetune_refuses_an_unfreeze_epoch_past_the_end(tmp_path, capsys) -> None:
    root = write_folder(tmp_path / "imgs", size=(16, 16), per_class=16)
    src = tmp_path / "src"
    assert train_one_step(root, src) == 0
    capsys.readouterr()
    code = main(
        [
            "finetune",
            "--from",
            str(src / "last.pt"),
            "--data-dir",
            str(root),
            "--epochs",
            "3",
            "--unfreeze-at",
            "3:1",
        ]
    )
    assert (
        code == 2
        and "the run has 3 epochs (0-based epochs 0..2), so it would never unfreeze"
        in capsys.readouterr().err
    )


def test_unwritable_outputs_are_named(tmp_path, capsys) -> None:
    run = tmp_path / "r"
    assert main(["train", "--iters", "1", "--no-progress", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    (tmp_path / "afile").write_text("")
    for fmt in ("onnx", "torchscript"):
        code = main(
            [
                "export",
                "--checkpoint",
                str(run / "last.pt"),
                "--format",
                fmt,
                "--out",
                str(tmp_path / "afile" / "m"),
            ]
        )
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "afile" in err and "Traceback" not in err, err


def test_replot_of_an_unfinished_landscape_says_so(tmp_path, capsys) -> None:
    run = tmp_path / "r"
    assert main(["train", "--iters", "1", "--no-progress", "--out", str(run), *TINY]) == 0
    base = ["analyze", "landscape", "--checkpoint", str(run / "last.pt"), "--grid", "3", "--samples", "16"]
    base += ["--mode", "1d", "--out", str(tmp_path / "l"), "--no-progress"]
    assert main(base) == 0
    npz = next((tmp_path / "l").glob("*_1d.npz"))
    saved = dict(np.load(npz))
    saved["loss"][1:] = np.nan  # as if stopped after one point
    np.savez(npz, **saved)
    capsys.readouterr()
    assert main([*base, "--replot"]) == 2
    assert "2 of 3 grid points are not computed yet; run without --replot" in capsys.readouterr().err


@pytest.mark.parametrize("pattern", [Pattern(r"\d+:\d+", "EPOCH:N")])
def test_patterns_explain_themselves(pattern: Pattern) -> None:
    assert pattern.problem("soon") == "must be EPOCH:N" and pattern.problem("2:1") is None


def test_help_needs_no_torch() -> None:
    code = "import sys, reslab.cli; reslab.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip() == "False"


def test_fine_tuning_an_rgb_checkpoint_on_grey_images(tmp_path, capsys) -> None:
    """The documented grey-scan path on real grey images (the embedded MNIST digits), with each
    first-conv adaptation mode."""
    from PIL import Image

    from reslab.data.sources import load_embedded

    colour = write_folder(tmp_path / "colour", size=(28, 28), per_class=16)
    src = tmp_path / "src"
    assert (
        main(["train", "--data-dir", str(colour), "--iters", "1", "--no-progress", "--out", str(src), *TINY])
        == 0
    )
    train, test = load_embedded()
    for split, arrays in (("train", train), ("test", test)):
        for i in range(40):
            d = tmp_path / "grey" / split / str(int(arrays.labels[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arrays.images[i, 0].numpy()).save(d / f"{i}.png")
    for mode in ("auto", "sum", "repeat"):
        out = tmp_path / f"ft-{mode}"
        argv = [
            "finetune",
            "--from",
            str(src / "last.pt"),
            "--data-dir",
            str(tmp_path / "grey"),
            "--epochs",
            "1",
        ]
        argv += ["--batch-size", "16", "--in-chans-mode", mode, "--no-progress", "--out", str(out)]
        assert main([*argv, f"data.cache_dir={tmp_path / 'c'}"]) == 0, capsys.readouterr().err
        ckpt = torch.load(out / "last.pt", weights_only=True)
        assert ckpt["in_chans"] == 1 and ckpt["model"]["conv1.weight"].shape[1] == 1
        assert len(ckpt["preprocess"]["mean"]) == 1  # the source's RGB statistics, averaged for grey
