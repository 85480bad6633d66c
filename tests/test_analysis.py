"""The residual-learning lab: each study's core against a known answer, then every study end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from reslab import create_model
from reslab.analysis.gradients import conv_grad_norms
from reslab.analysis.landscape import filter_normalized_direction, surface
from reslab.analysis.lesion import lesioned, path_lengths, removable_blocks
from reslab.analysis.responses import layer_response_stds
from reslab.cli import main
from reslab.config import load_config
from reslab.weights import read_file


def test_filter_normalized_direction_matches_weight_filter_norms() -> None:
    model = create_model("resnet20")
    direction = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    for p, d in zip(model.parameters(), direction, strict=True):
        if p.ndim <= 1:
            assert not d.any()  # BN and bias directions are zero
        else:
            torch.testing.assert_close(d.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))


def test_zero_direction_gives_a_flat_landscape(tmp_path) -> None:
    model = create_model("resnet20").eval()
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))]
    zero = [torch.zeros_like(p) for p in model.parameters()]
    coords = np.linspace(-1, 1, 3)
    grid = surface(model, batches, [zero, zero], [coords, coords], tmp_path / "flat.npz", progress=False)
    assert np.ptp(grid["loss"]) < 1e-6 and np.ptp(grid["err"]) == 0


def test_landscape_resumes_where_it_stopped(tmp_path, monkeypatch) -> None:
    import reslab.analysis.landscape as landscape

    model = create_model("resnet20").eval()
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    d = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    coords = np.linspace(-1, 1, 4)
    full = surface(model, batches, [d], [coords], tmp_path / "a.npz", progress=False)
    saved = dict(np.load(tmp_path / "a.npz"))
    saved["loss"][2:] = np.nan  # as if interrupted after two points
    np.savez(tmp_path / "a.npz", **saved)
    calls = []
    original = landscape.evaluate
    monkeypatch.setattr(landscape, "evaluate", lambda m, b: calls.append(1) or original(m, b))
    again = surface(model, batches, [d], [coords], tmp_path / "a.npz", progress=False)
    assert len(calls) == 2
    np.testing.assert_allclose(again["loss"], full["loss"], rtol=1e-5)


def test_lesioning_a_zero_branch_changes_nothing() -> None:
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    block = model.layer2[1]
    nn.init.zeros_(block.bn2.weight)  # the branch now outputs exactly zero
    nn.init.zeros_(block.bn2.bias)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        index = model.blocks().index(block)
        with lesioned(model, [index]):
            after = model(x)
    torch.testing.assert_close(after, before)
    assert index in removable_blocks(model) and 3 not in removable_blocks(model)  # layer2.0 changes shape


def test_gradient_norms_match_a_hand_computed_network() -> None:
    conv = nn.Conv2d(1, 2, 1, bias=False)
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x, y = torch.rand(1, 1, 4, 4), torch.tensor([1])
    ((name, norm),) = conv_grad_norms(model, x, y)
    with torch.no_grad():  # logits_k = w_k * mean(x); dL/dw_k = (softmax_k - onehot_k) * mean(x)
        p = (conv.weight.flatten() * x.mean()).softmax(0)
        expected = ((p - torch.tensor([0.0, 1.0])) * x.mean()).norm().item()
    assert name == "0" and norm == pytest.approx(expected, rel=1e-5)


def test_response_std_matches_a_manual_computation() -> None:
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    x = torch.randn(6, 3, 32, 32)
    stds = dict(layer_response_stds(model, [(x, torch.zeros(6, dtype=torch.long))]))
    assert len(stds) == 18  # two 3x3 layers in each of 9 blocks
    with torch.no_grad():
        h = model.act1(model.bn1(model.conv1(x)))
        manual = model.layer1[0].bn1(model.layer1[0].conv1(h)).double().std(unbiased=False).item()
    assert stds["layer1.0.bn1"] == pytest.approx(manual, rel=1e-6)


def test_path_lengths_are_binomial() -> None:
    dist = path_lengths(4)
    assert dist == [1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16] and sum(path_lengths(27)) == pytest.approx(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A residual and a plain checkpoint, briefly trained on the embedded real digits."""
    from reslab.config import load_config
    from reslab.engine import fit

    tmp = tmp_path_factory.mktemp("lab")
    paths = {}
    for name in ("resnet20", "plain20"):
        fit(
            load_config(
                overrides={
                    "device": "cpu",
                    "model": name,
                    "data.limit_train": 512,
                    "data.limit_test": 200,
                    "iters": 24,
                    "data.batch_size": 64,
                    "progress": False,
                    "out": str(tmp / name),
                }
            )
        )
        paths[name] = str(tmp / name / "last.pt")
    return tmp, paths


def test_degradation_study_end_to_end(tmp_path, capsys) -> None:
    assert (
        main(
            [
                "analyze",
                "degradation",
                "--depths",
                "20",
                "--quick",
                "--iters",
                "4",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {m["name"] for m in summary["models"]} == {"plain20", "resnet20"}
    for m in summary["models"]:
        # the study's numbers are its runs' numbers: the last evaluation and the logged training error
        run = json.loads((tmp_path / "runs" / m["name"] / "summary.json").read_text())
        rows = [
            json.loads(x) for x in (tmp_path / "runs" / m["name"] / "metrics.jsonl").read_text().splitlines()
        ]
        iters = [r for r in rows if r["kind"] == "iter"]
        assert m["iterations"] == run["iterations"] == 4 and m["test_error"] == run["eval_err"]
        assert m["train_error"] == pytest.approx(sum(r["train_err"] for r in iters) / len(iters))
    assert (tmp_path / "degradation.png").exists() and (tmp_path / "summary.md").exists()
    assert "plain" in capsys.readouterr().out


def test_gradients_study_end_to_end(tmp_path) -> None:
    assert (
        main(
            [
                "analyze",
                "gradients",
                "--depths",
                "20",
                "--steps",
                "2",
                "--batch",
                "16",
                "--correlation",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    norms = {m["name"]: m for m in json.loads((tmp_path / "gradient_norms.json").read_text())}
    for m in summary["models"]:
        init, trained = (norms[m["name"]][k] for k in ("init", "trained"))
        assert len(init) == 19  # the 19 convs of a 20-layer net (shortcut projections excluded)
        assert m["init_first_last_ratio"] == pytest.approx(init[0][1] / init[-1][1])
        assert m["trained_first_last_ratio"] == pytest.approx(trained[0][1] / trained[-1][1])
        assert init != trained  # two training steps moved the weights
        assert len(norms[m["name"]]["correlation"]) == 64 and norms[m["name"]]["correlation"][
            0
        ] == pytest.approx(1)
    assert (tmp_path / "gradient_norms.png").exists() and (tmp_path / "gradient_correlation.png").exists()


def test_responses_landscape_lesion_and_report(trained, tmp_path) -> None:
    _, paths = trained
    ckpts = [paths["resnet20"], paths["plain20"]]
    assert (
        main(["analyze", "responses", "--checkpoint", *ckpts, "--limit", "64", "--out", str(tmp_path / "r")])
        == 0
    )
    assert len(json.loads((tmp_path / "r" / "summary.json").read_text())["checkpoints"][0]["stds"]) == 18
    land = [
        "analyze",
        "landscape",
        "--checkpoint",
        *ckpts,
        "--grid",
        "3",
        "--samples",
        "32",
        "--out",
        str(tmp_path / "l"),
        "--no-progress",
    ]
    assert main(land) == 0
    assert (tmp_path / "l" / "landscape_2d.png").exists() and (tmp_path / "l" / "landscape_1d.png").exists()
    assert main([*land, "--replot"]) == 0
    assert (
        main(
            [
                "analyze",
                "landscape",
                "--checkpoint",
                paths["resnet20"],
                paths["resnet20"],
                "--interpolate",
                "--grid",
                "3",
                "--samples",
                "16",
                "--mode",
                "1d",
                "--out",
                str(tmp_path / "i"),
                "--no-progress",
            ]
        )
        == 0
    )
    curve = np.load(tmp_path / "i" / "interpolation.npz")
    assert np.ptp(curve["loss"]) < 1e-5  # interpolating a model with itself changes nothing
    assert (
        main(
            [
                "analyze",
                "lesion",
                "--checkpoint",
                *ckpts,
                "--limit",
                "64",
                "--draws",
                "2",
                "--max-k",
                "3",
                "--out",
                str(tmp_path / "x"),
                "--no-progress",
            ]
        )
        == 0
    )
    lesion = json.loads((tmp_path / "x" / "summary.json").read_text())["checkpoints"]
    assert lesion[0]["removable"] == 7 and lesion[0]["k_curve"][-1]["k"] == 3
    assert (
        main(
            [
                "analyze",
                "report",
                str(tmp_path / "r"),
                str(tmp_path / "x"),
                str(trained[0] / "resnet20"),
                "--out",
                str(tmp_path / "report.html"),
            ]
        )
        == 0
    )
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4 and "<table>" in page


def test_paper_study_runs_in_parallel_processes_and_is_restartable(tmp_path) -> None:
    """`--paper`: the twins up to 56 layers and the deeper ResNets alone, each a run directory trained
    by its own process, summarised against Table 6; a second call reuses the finished runs."""
    out = tmp_path / "paper"
    argv = ["analyze", "degradation", "--paper", "--depths", "20,110", "--iters", "2", "--data", "default"]
    argv += ["--jobs", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["plain20", "resnet20", "resnet110"]  # no plain-110
    assert summary["jobs"] == 2 and summary["wall_s"] > 0 and "img/s" in (out / "summary.md").read_text()
    for m in summary["models"]:
        run = json.loads((out / "runs" / m["name"] / "summary.json").read_text())
        assert run["iterations"] == 2 and m["test_error"] == run["eval_err"]
        assert m["img_s"] == round(2 * 128 / run["train_seconds"])  # its training speed
        assert "reslab: training" in (out / "runs" / m["name"] / "train.log").read_text()  # its own process
    table = (out / "summary.md").read_text()
    assert "| resnet20 |" in table and "| 8.75 | 8.27 |" in table and "| 6.43 | 6.32 |" in table
    assert (out / "summary.html").exists() and (out / "degradation.png").exists()
    before = (out / "runs" / "resnet20" / "last.pt").read_bytes()
    assert main(argv) == 0  # nothing left to train: the finished runs are reused
    assert (out / "runs" / "resnet20" / "last.pt").read_bytes() == before
    assert main(["analyze", "degradation", "--paper", "--quick", "--out", str(tmp_path / "x")]) == 2


def test_runs_are_packed_longest_first_and_concurrency_is_measured() -> None:
    from reslab.analysis.runner import GAIN, Concurrency, PlannedRun, longest_first

    runs = [
        PlannedRun(n, load_config("cifar10_paper", {"model": n}))
        for n in ("resnet20", "resnet110", "plain56")
    ]
    assert [r.label for r in longest_first(runs)] == ["resnet110", "plain56", "resnet20"]
    c = Concurrency(cap=4)
    assert c.start == 1 and c.observe(1, 100.0) and c.observe(2, 180.0)  # still rising: one more
    assert not c.observe(3, 180.0 * GAIN * 0.99) and c.settled  # not 10% more: hold at three
    assert not c.observe(3, 1e9)  # settled stays settled
    capped = Concurrency(cap=2)
    assert capped.observe(1, 1.0) and not capped.observe(2, 10.0)  # the cap
    assert not Concurrency(cap=4, fixed=3).observe(3, 1.0) and Concurrency(cap=4, fixed=3).start == 3


def test_runs_trained_at_once_end_as_they_would_alone(tmp_path) -> None:
    """Two runs in processes of their own (the capturable step, uncaptured on a CPU) give bitwise the
    weights each gives trained alone in this process."""
    from reslab.analysis.runner import PlannedRun, train_runs
    from reslab.weights import read_file

    tiny = {"data.limit_train": 64, "data.limit_test": 20, "data.batch_size": 32, "iters": 3}
    tiny.update(device="cpu", cuda_graphs="on", progress=False)

    def plan(folder: str) -> list[PlannedRun]:
        return [
            PlannedRun(m, load_config(overrides={**tiny, "model": m, "out": str(tmp_path / folder / m)}))
            for m in ("resnet20", "plain20")
        ]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the children's share
    try:
        with pytest.warns(UserWarning, match="capturable step runs uncaptured"):
            alone = train_runs(plan("alone"), jobs=1, progress=False)
        packed = train_runs(plan("packed"), jobs=2, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert alone["jobs"] == 1 and packed["jobs"] == 2 and packed["wall_s"] > 0
    for m in ("resnet20", "plain20"):
        a, b = (read_file(tmp_path / f / m / "last.pt")["model"] for f in ("alone", "packed"))
        assert all(torch.equal(v, b[k]) for k, v in a.items()), m
        assert "reslab: training" in (tmp_path / "packed" / m / "train.log").read_text()


def test_reproduce_reports_the_mean_and_spread_over_seeds(tmp_path, capsys) -> None:
    import statistics

    from reslab.inference import evaluate_checkpoints

    out = tmp_path / "rep"
    args = ["reproduce", "--config", "mnist_quick", "--seeds", "2", "--tta", "flip", "--device", "cpu"]
    args += ["--jobs", "1", "--out", str(out), "--no-progress", "iters=2", "data.limit_train=64"]
    args += ["data.limit_test=40", "data.batch_size=32"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    errors = [json.loads((Path(r["run_dir"]) / "summary.json").read_text())["eval_err"] for r in runs]
    assert [r["seed"] for r in runs] == [0, 1] and [r["test_error"] for r in runs] == errors
    assert summary["test_error_mean"] == pytest.approx(statistics.fmean(errors))
    assert summary["test_error_std"] == pytest.approx(statistics.stdev(errors))
    flip = evaluate_checkpoints(
        [str(Path(runs[1]["run_dir"]) / "last.pt")], tta="flip", device="cpu", precision="fp32"
    )
    assert runs[1]["tta_error"] == pytest.approx(flip["top1_err"])
    a, b = (read_file(Path(r["run_dir"]) / "last.pt")["model"] for r in runs)
    assert not torch.equal(a["conv1.weight"], b["conv1.weight"])  # seeds differ
    assert "test error:" in (out / "summary.md").read_text() and (out / "reproduce.png").exists()
    capsys.readouterr()
    assert main(args) == 0  # the same study again: its runs are reused, and it says so
    assert "reusing 2 finished run(s) of this study: seed0, seed1" in capsys.readouterr().err
