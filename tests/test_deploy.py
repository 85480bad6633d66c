"""Deployment: BN folding for every family, verified exports, int8, benchmarks, the image pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from reslab import ReslabError, list_models
from reslab.deploy import fold_batchnorm
from reslab.models import get_model_entry
from tests.conftest import compact_model, small_input
from tests.test_reference import _randomise_norms

FAMILIES = {}
for _name in list_models():
    FAMILIES.setdefault(get_model_entry(_name).family, _name)


@pytest.mark.parametrize("name", sorted(FAMILIES.values()))
def test_fold_batchnorm_is_exact_for_every_family(name: str) -> None:
    model = _randomise_norms(compact_model(name, num_classes=10))
    x = small_input(name)
    folded = fold_batchnorm(model)
    # GroupNorm normalises with each input's own statistics: nothing to fold
    assert type(folded) is type(model) and (folded.folded_norms > 0) == (model.spec.norm == "batch")
    left = [m for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not model.spec.preact:
        assert not left  # post-activation nets fold every BN
    else:
        # each block's input BN-ReLU and the final one stay, except where the input is a conv used only
        # there (the stem conv of a net whose first block projects its shortcut, as WRN's)
        assert len(model.blocks()) <= len(left) <= len(model.blocks()) + 1
    with torch.no_grad():
        ref = model(x)
        # float32: rounding differs, relative to the output's scale (untrained deep nets reach ~100)
        torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
        # float64: the folding itself is exact
        exact = fold_batchnorm(model.double())
        torch.testing.assert_close(exact(x.double()), model(x.double()), rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def cifar_checkpoint(tmp_path_factory) -> tuple:
    """A small trained checkpoint with its real-looking test data (a tiny colour folder)."""
    from reslab.config import load_config
    from reslab.engine import fit
    from tests.fakedata import write_folder

    tmp = tmp_path_factory.mktemp("deploy")
    root = write_folder(tmp / "imgs", size=(32, 32), per_class=16)
    cfg = load_config(
        overrides={
            "device": "cpu",
            "model": "resnet20",
            "data.name": "folder",
            "data.dir": str(root),
            "data.batch_size": 16,
            "data.cache_dir": str(tmp / "cache"),
            "epochs": 2,
            "progress": False,
            "out": str(tmp / "run"),
        }
    )
    fit(cfg)
    return tmp / "run" / "last.pt", root


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported"])
@pytest.mark.parametrize("fold", [False, True])
def test_export_is_verified_and_carries_metadata(cifar_checkpoint, tmp_path, fmt: str, fold: bool) -> None:
    from reslab.deploy import real_inputs
    from reslab.deploy.export import export_model, run_exported
    from reslab.engine import read_checkpoint

    ckpt = read_checkpoint(cifar_checkpoint[0], device="cpu")
    x = real_inputs(ckpt, None, 7)
    report = export_model(ckpt, fmt, tmp_path / f"m.{fmt}", fold_bn=fold, verify_inputs=x)
    assert report["verified_on"] == 7 and report["top1_agreement"] == 1.0  # batch 7 != the example's 2
    sidecar = json.loads((tmp_path / f"m.{fmt}.json").read_text())
    assert sidecar["classes"] == ["cat", "dog", "fish"] and sidecar["preprocess"]["size"] == [32, 32]
    if fmt == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
        assert json.loads(props["reslab.classes"]) == ["cat", "dog", "fish"]
        assert onnx.load(str(tmp_path / "m.onnx")).opset_import[0].version >= 17
    assert run_exported(tmp_path / f"m.{fmt}", fmt, x[:1]).shape == (1, 3)


def test_fixed_batch_export_and_failed_verification(cifar_checkpoint, tmp_path, monkeypatch) -> None:
    import reslab.deploy.export as export
    from reslab.deploy import real_inputs
    from reslab.engine import read_checkpoint

    ckpt = read_checkpoint(cifar_checkpoint[0], device="cpu")
    x = real_inputs(ckpt, None, 4)
    assert (
        export.export_model(ckpt, "onnx", tmp_path / "b4.onnx", batch=4, verify_inputs=x)["verified_on"] == 4
    )
    original = export.run_exported
    monkeypatch.setattr(export, "run_exported", lambda *a: original(*a) + 0.5)
    with pytest.raises(ReslabError, match="verification failed"):
        export.export_model(ckpt, "torchscript", tmp_path / "bad.pt", verify_inputs=x)


def test_export_cli(cifar_checkpoint, tmp_path) -> None:
    ckpt, _ = cifar_checkpoint
    out = tmp_path / "cli.onnx"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "reslab",
            "export",
            "--checkpoint",
            str(ckpt),
            "--format",
            "onnx",
            "--fold-bn",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["max_abs_diff"] < 1e-3 and out.exists()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "reslab",
            "export",
            "--checkpoint",
            str(ckpt),
            "--format",
            "onnx",
            "--batch",
            "zero",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "argument --batch: expected int, got 'zero'" in proc.stderr


def test_int8_quantization_report(cifar_checkpoint, tmp_path) -> None:
    from reslab.deploy.quantize import quantize_report

    ckpt, _ = cifar_checkpoint
    r = quantize_report(str(ckpt), str(tmp_path / "m.int8.onnx"), calib_n=32, min_time=0.01)
    assert r["calibration_images"] == 32 and r["test_images"] == 48
    assert abs(r["int8_top1_err"] - r["fp32_top1_err"]) <= 0.15 and r["top1_agreement"] >= 0.8
    assert r["bytes"]["int8"] < r["bytes"]["fp32"] / 2
    for bs in (1, 8):  # the speed-up is the ratio of the two measured throughputs, each at its median
        fp32, int8 = r[f"fp32_b{bs}"], r[f"int8_b{bs}"]
        assert fp32["img_per_s"] == pytest.approx(bs / (fp32["p50_ms"] / 1e3))
        assert r[f"int8_speedup_b{bs}"] == pytest.approx(int8["img_per_s"] / fp32["img_per_s"])


def test_bench_json_contract(capsys) -> None:
    from reslab.cli import main

    args = [
        "bench",
        "resnet18",
        "--input-size",
        "64",
        "--batch",
        "1,2",
        "--min-time",
        "0.05",
        "--json",
        "--backends",
        "torchvision,reslab,reslab-cl-fold,ort-fp32",
        "--precision",
        "fp32,bf16",
    ]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    expected = {("torchvision", "fp32"), ("ort-fp32", "fp32")}  # references and ORT: fp32 only
    expected |= {(b, p) for b in ("reslab", "reslab-cl-fold") for p in ("fp32", "bf16")}
    assert {(r["backend"], r["precision"], r["batch"]) for r in rows} == {
        (b, p, n) for b, p in expected for n in (1, 2)
    }
    for r in rows:
        assert {"backend", "batch", "img_per_s", "p50_ms", "p90_ms", "peak_fraction"} <= set(r)
        tv = next(t for t in rows if t["backend"] == "torchvision" and t["batch"] == r["batch"])
        assert r["img_per_s"] == pytest.approx(r["batch"] / (r["p50_ms"] / 1e3))
        assert r["top1_agree"] == 1.0 or r["precision"] == "bf16"  # bf16 may flip near-ties on random inputs
        assert r["vs_torchvision"] == pytest.approx(r["img_per_s"] / tv["img_per_s"])


def test_bench_rows_agree_with_fp32_on_a_checkpoints_real_images(cifar_checkpoint) -> None:
    """A checkpoint is benchmarked on its own test images: every precision's top-1 agrees with
    fp32 there (random inputs give near-tied logits, whose flips say nothing)."""
    from reslab.deploy.bench import bench

    result = bench(
        str(cifar_checkpoint[0]),
        batches=(8,),
        backends=("reslab", "reslab-cl-fold"),
        precisions=("fp32", "bf16"),
        min_time=0.05,
        device="cpu",
    )
    assert {(r["backend"], r["precision"]) for r in result["rows"]} == {
        (b, p) for b in ("reslab", "reslab-cl-fold") for p in ("fp32", "bf16")
    }
    assert all(r["top1_agree"] == 1.0 for r in result["rows"]), result["rows"]


def test_bench_takes_a_one_channel_checkpoint(tmp_path) -> None:
    from reslab import create_model, save_weights
    from reslab.complexity import count_macs
    from reslab.deploy.bench import bench

    save_weights(create_model("resnet20", in_chans=1, num_classes=4), tmp_path / "grey.pt", in_chans=1)
    with pytest.warns(UserWarning, match="torchvision has no resnet20"):
        result = bench(
            str(tmp_path / "grey.pt"),
            batches=(2,),
            min_time=0.02,
            device="cpu",
            backends=("torchvision", "reslab", "reslab-cl-fold"),
        )
    macs = count_macs(create_model("resnet20", in_chans=1, num_classes=4), (1, 1, 32, 32))
    assert result["gflops_per_image"] == pytest.approx(2 * macs / 1e9)
    assert {r["backend"] for r in result["rows"]} >= {"reslab", "reslab-cl-fold"}


def test_the_reference_runs_with_pytorchs_tf32_defaults_and_each_row_says_its_own() -> None:
    from reslab.deploy.bench import _set_tf32_for

    cuda = torch.device("cuda")  # only the switches are set: no CUDA device needed
    try:
        assert _set_tf32_for("torchvision", "fp32", cuda).startswith("PyTorch default")
        assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert _set_tf32_for("reslab", "fp32", cuda) == "off" and not torch.backends.cudnn.allow_tf32
        assert _set_tf32_for("reslab", "tf32", cuda) == "on" and torch.backends.cuda.matmul.allow_tf32
        assert _set_tf32_for("torchvision", "fp32", torch.device("cpu")) == "n/a"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False


def test_predict_skips_or_refuses_bad_files(cifar_checkpoint, tmp_path) -> None:
    ckpt, root = cifar_checkpoint
    folder = tmp_path / "mixed"
    folder.mkdir()
    for f in sorted((root / "test" / "cat").iterdir())[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    base = [sys.executable, "-m", "reslab", "predict", "--checkpoint", str(ckpt), str(folder), "--json"]
    proc = subprocess.run(base, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 3
    assert "broken.jpg" in proc.stderr and "notes.txt" in proc.stderr
    proc = subprocess.run([*base, "--strict"], capture_output=True, text=True)
    assert proc.returncode == 2 and "notes.txt: not an image file" in proc.stderr
    (folder / "notes.txt").unlink()
    proc = subprocess.run([*base, "--strict"], capture_output=True, text=True)
    assert proc.returncode == 2 and "broken.jpg" in proc.stderr and "Traceback" not in proc.stderr


def test_inference_precision_is_chosen_reported_and_checked(cifar_checkpoint, tmp_path, capsys) -> None:
    """--precision runs eval, predict and embed in bf16/fp16 with the top-1 agreement with fp32
    measured on the real images; auto is fp32 on a CPU."""
    from reslab.cli import main

    ckpt, root = cifar_checkpoint
    cpu = ["--device", "cpu"]
    assert main(["eval", "--checkpoint", str(ckpt), "--json", *cpu]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert fp32["precision"] == {"precision": "fp32", "chosen_from": "auto"}
    assert main(["eval", "--checkpoint", str(ckpt), "--precision", "bf16", "--json", *cpu]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    chosen = bf16["precision"]
    assert (
        chosen["precision"] == "bf16"
        and chosen["agreement_images"] == 48
        and chosen["top1_agreement_with_fp32"] >= 0.9
    )
    assert abs(bf16["top1_err"] - fp32["top1_err"]) <= 0.1
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(ckpt),
                str(root / "test" / "cat"),
                "--precision",
                "fp16",
                "--json",
                *cpu,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert (
        len(json.loads(captured.out)) == 16
        and "reslab: precision fp16; top-1 agreement with fp32" in captured.err
    )
    index = tmp_path / "index.npy"
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(ckpt),
                str(root / "test"),
                "--out",
                str(index),
                "--precision",
                "bf16",
                *cpu,
            ]
        )
        == 0
    )
    assert json.loads(index.with_suffix(".json").read_text())["precision"] == "bf16"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt), "--precision", "tf32", "--json", *cpu]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == {
        "precision": "fp32",
        "asked": "tf32",
        "why": "no TF32 off CUDA",
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: auto chooses between bf16 and fp16")
def test_auto_precision_on_cuda_is_measured_and_checked(cifar_checkpoint, capsys) -> None:
    from reslab.cli import main

    assert main(["eval", "--checkpoint", str(cifar_checkpoint[0]), "--json", "--device", "cuda"]) == 0
    chosen = json.loads(capsys.readouterr().out)["precision"]
    assert chosen["chosen_from"] == "auto" and chosen["precision"] in ("bf16", "fp16")
    assert set(chosen["ms_per_batch"]) == {"bf16", "fp16"} and chosen["top1_agreement_with_fp32"] >= 0.9


def test_half_precision_onnx_export_is_verified(cifar_checkpoint, tmp_path) -> None:
    from reslab.deploy import real_inputs
    from reslab.deploy.export import export_model
    from reslab.engine import read_checkpoint

    ckpt = read_checkpoint(cifar_checkpoint[0], device="cpu")
    x = real_inputs(ckpt, None, 8)
    report = export_model(
        ckpt, "onnx", tmp_path / "m16.onnx", fold_bn=True, verify_inputs=x, precision="fp16"
    )
    assert (
        report["precision"] == "fp16"
        and report["verified_on"] == 8
        and report["verified_with"].endswith("ExecutionProvider")
    )
    assert report["max_abs_diff"] <= report["tolerance"]
    import onnx

    graph = onnx.load(str(tmp_path / "m16.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    with pytest.raises(ReslabError, match="torchscript is written in fp32"):
        export_model(ckpt, "torchscript", tmp_path / "m.pt", precision="fp16")


# --- on the device: ExecuTorch, Core ML, int8, bundles ------------------------------------------


def test_executorch_fp32_is_verified_by_its_runtime_on_real_images(cifar_checkpoint, tmp_path) -> None:
    from reslab.deploy import real_inputs
    from reslab.deploy.export import export_model, run_exported
    from reslab.engine import read_checkpoint

    ckpt = read_checkpoint(cifar_checkpoint[0], device="cpu")
    x = real_inputs(ckpt, None, 6)
    report = export_model(ckpt, "pte", tmp_path / "m.pte", verify_inputs=x)
    assert report["verified_with"].startswith("ExecuTorch runtime") and report["top1_agreement"] == 1.0
    assert report["folded_bn"] and report["batch"] == 1 and report["max_abs_diff"] < 1e-3
    torch.testing.assert_close(run_exported(tmp_path / "m.pte", "pte", x), ckpt.model(x), rtol=0, atol=1e-3)
    with pytest.raises(ReslabError, match="runs one fixed batch size"):
        export_model(ckpt, "pte", tmp_path / "d.pte", batch="dynamic")
    with pytest.raises(ReslabError, match="int8 is written for onnx, pte, not torchscript"):
        export_model(ckpt, "torchscript", tmp_path / "q.pt", quantize="int8")
    with pytest.raises(ReslabError, match=r"calibration images of shape \(1, 32, 32\) do not fit"):
        export_model(ckpt, "pte", tmp_path / "q.pte", quantize="int8", calibration=torch.rand(8, 1, 32, 32))


def test_preactivation_batchnorm_is_decomposed_for_xnnpack(tmp_path) -> None:
    """Pre-activation blocks keep BatchNorms no conv precedes: they become two delegated ops, and
    the program still computes the model."""
    from reslab import create_model
    from reslab.deploy.edge import ChannelAffine, decompose_batchnorm, pte_runner, write_pte
    from reslab.deploy.fold import fold_batchnorm

    model = create_model("preact_resnet18_cifar", num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    folded = fold_batchnorm(model)
    assert decompose_batchnorm(folded) > 0 and any(isinstance(m, ChannelAffine) for m in folded.modules())
    x = torch.randn(2, 3, 32, 32)
    write_pte(folded, x, tmp_path / "p.pte")
    torch.testing.assert_close(pte_runner(tmp_path / "p.pte")(x), model(x), rtol=1e-4, atol=1e-4)


def test_int8_keeps_accuracy_and_reports_it_on_the_test_split(cifar_checkpoint, tmp_path, capsys) -> None:
    from reslab.cli import main

    ckpt, _ = cifar_checkpoint
    for fmt in ("pte", "onnx"):
        out = tmp_path / f"q.{fmt}"
        args = ["export", "--checkpoint", str(ckpt), "--format", fmt, "--quantize", "int8", "--out", str(out)]
        assert main([*args, "--calib-n", "64", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        accuracy = report["accuracy"]
        assert report["precision"] == "int8" and accuracy["test_images"] == 48
        assert accuracy["int8"]["top1_agreement_with_fp32"] >= 0.9
        assert accuracy["int8"]["top1_err"] <= accuracy["pytorch-fp32"]["top1_err"] + 0.1
    assert (tmp_path / "q.pte").stat().st_size < 0.5 * (ckpt.stat().st_size)  # int8 weights


def test_coreml_package_carries_the_normalisation_and_labels(cifar_checkpoint, tmp_path) -> None:
    from reslab.deploy.edge import first_conv, image_normalisation
    from reslab.deploy.export import export_model
    from reslab.engine import read_checkpoint

    ckpt = read_checkpoint(cifar_checkpoint[0], device="cpu")
    report = export_model(ckpt, "coreml", tmp_path / "m.mlpackage")
    spec = report["coreml"]
    assert (spec["input"], spec["input_type"], spec["input_size"], spec["color"]) == (
        "image",
        "imageType",
        [32, 32],
        "RGB",
    )
    assert spec["outputs"] == ["classLabel", "classLabel_probs"] and spec["conv_precision"] == "fp16"
    assert report["predicted"] is False  # Core ML runs on macOS only: not claimed here
    fp32 = export_model(ckpt, "coreml", tmp_path / "m32.mlpackage", precision="fp32")
    assert fp32["coreml"]["conv_precision"] == "fp32" and fp32["bytes"] > report["bytes"]
    # the image input's scale and biases and the factors folded into the first conv compute exactly
    # the model's per-channel normalisation
    pre = ckpt.preprocess
    scale, bias, factors = image_normalisation(pre)
    pixels = torch.randint(0, 256, (2, 3, 32, 32)).float()
    model = ckpt.model.eval()
    expected = model(
        (pixels / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    )
    import copy

    folded = copy.deepcopy(model)
    conv = first_conv(folded)
    with torch.no_grad():
        conv.weight.mul_(factors.view(1, -1, 1, 1))
        got = folded(scale * pixels + torch.tensor(bias).view(1, 3, 1, 1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_bundle_runs_without_reslab_and_fails_whole(
    cifar_checkpoint, tmp_path, capsys, monkeypatch
) -> None:
    import subprocess
    import sys

    from reslab.cli import main

    ckpt, root = cifar_checkpoint
    bundle = tmp_path / "app"
    args = [
        "export",
        "--checkpoint",
        str(ckpt),
        "--format",
        "pte",
        "--bundle",
        str(bundle),
        "--quantize",
        "int8",
    ]
    assert main([*args, "--calib-n", "32"]) == 0
    files = sorted(p.name for p in bundle.iterdir())
    assert files == [
        "README.md",
        "bundle.json",
        "labels.txt",
        "model-int8.pte",
        "model.pte",
        "predict.py",
        "preprocess.json",
    ]
    facts = json.loads((bundle / "bundle.json").read_text())
    assert set(facts["files"]) == {"fp32", "int8"} and facts["test"]["test_images"] == 48
    card = (bundle / "README.md").read_text()
    assert (
        "| `model-int8.pte` | int8 |" in card
        and "top-1 error" in card
        and "Calibration: 32 real images" in card
    )
    image = sorted((root / "test" / "dog").iterdir())[0]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = "import runpy, sys; sys.modules['reslab'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    done = subprocess.run(
        [sys.executable, "-c", script, str(bundle / "predict.py"), str(image), "--top", "1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    capsys.readouterr()
    assert (
        main(["predict", "--checkpoint", str(ckpt), str(image), "--topk", "1", "--json", "--device", "cpu"])
        == 0
    )
    expected = json.loads(capsys.readouterr().out)[0]["top"][0]["class"]
    assert done.stdout.split("\t")[0] == expected
    # a failure half-way (the int8 file's verification) leaves the earlier bundle as it was
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    import reslab.deploy.export as export

    original = export.run_exported
    monkeypatch.setattr(
        export, "run_exported", lambda p, f, x: original(p, f, x) + (100.0 if "int8" in str(p) else 0.0)
    )
    assert main([*args, "--calib-n", "32"]) == 2
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".app")]  # no half-written bundle


def test_a_missing_extra_is_one_line(cifar_checkpoint, tmp_path, capsys, monkeypatch) -> None:
    import importlib

    from reslab.cli import main

    real = importlib.import_module

    def without_executorch(name, *a, **k):
        if name.split(".")[0] == "executorch":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", without_executorch)
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(cifar_checkpoint[0]),
                "--format",
                "pte",
                "--out",
                str(tmp_path / "m.pte"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.strip() == "reslab: error: executorch is not installed; pip install 'reslab[edge]'"
