"""The engine owns resume and the checkpoint: one typed format, earlier versions read, what a run
used recorded, resume and new budgets from Python, and the training policy rebuilt by kind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from reslab.config import load_config
from reslab.engine import fit, read_checkpoint
from reslab.engine.checkpoint import FORMAT, RunCheckpoint, read_run_checkpoint
from reslab.engine.fit import TrainPolicy, policy_from_record
from reslab.errors import ReslabError

GOLDEN = Path(__file__).parent / "golden"
# Written by reslab at commit 373a811 (format 1): `reslab train --model wrn10_1 --iters 6
# data.limit_test=30 data.batch_size=16 log_every=1 ema_decay=0.9 optim.lr=0.05`
# interrupted at iteration 3 (iter3.pt), and the same run left alone (its final weights: iter6),
# both with OMP_NUM_THREADS=1 (the float order of a convolution depends on the thread count).
OLD_CHECKPOINT = GOLDEN / "main-373a811-wrn10_1-iter3.pt"
OLD_FINAL = GOLDEN / "main-373a811-wrn10_1-iter6.safetensors"


def test_a_checkpoint_of_an_earlier_version_resumes_to_that_versions_weights(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(OLD_CHECKPOINT, run / "last.pt")
    old = read_run_checkpoint(run / "last.pt")
    assert old.format == 1 and old.state.iteration == 3 and old.resumable and old.policy is None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = fit(resume=run, device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert result.iterations == 6
    new = read_run_checkpoint(run / "last.pt")
    assert new.format == FORMAT and new.settings["device"] == "cpu" and new.code_version.startswith("reslab")
    expected = load_file(OLD_FINAL)
    for k, v in expected.items():
        assert torch.equal(new.model[k], v), k
    # ... and it reads for inference as before
    assert read_checkpoint(OLD_CHECKPOINT, device="cpu").arch == "wrn10_1"


TINY = {
    "model": "wrn10_1",
    "data.limit_train": 64,
    "data.limit_test": 32,
    "data.batch_size": 16,
    "log_every": 1,
    "progress": False,
    "device": "cpu",
}


def test_the_run_records_what_it_used_and_a_finished_run_takes_a_new_budget(tmp_path) -> None:
    first = fit(load_config(overrides={**TINY, "iters": 4, "out": str(tmp_path / "run")}))
    config = yaml.safe_load((first.run_dir / "config.yaml").read_text())
    settings = json.loads((first.run_dir / "summary.json").read_text())["settings"]
    # "auto" resolved for this device, and why CUDA graphs are off
    assert (config["amp"], config["compile"], config["cuda_graphs"], config["tf32"]) == (
        "none",
        "off",
        "off",
        False,
    )
    assert settings["cuda_graphs"] == "off" and settings["cuda_graphs_why"] == "no CUDA device"
    assert settings["device"] == "cpu" and settings["decode"] == "cpu" and settings["world"] == 1
    # ... while the checkpoint keeps the config as asked, so a run resumed on a GPU resolves anew
    assert read_run_checkpoint(first.run_dir / "last.pt").config["amp"] == "auto"
    more = fit(resume=first.run_dir, iters=8, progress=False)  # 4 more iterations, from Python
    assert more.iterations == 8 and more.run_dir == first.run_dir
    with pytest.raises(ReslabError, match="has trained 8 iterations already"):
        fit(resume=first.run_dir, iters=6, progress=False)
    rows = [json.loads(x) for x in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r["kind"] == "iter"] == list(range(1, 9))


def test_fit_says_what_a_resume_may_change(tmp_path) -> None:
    with pytest.raises(ReslabError, match="continues with the config and policy its checkpoint records"):
        fit(load_config(overrides=TINY), resume=tmp_path)
    with pytest.raises(ReslabError, match="fit needs a config"):
        fit()
    weights = tmp_path / "weights.pt"
    torch.save(RunCheckpoint({"w": torch.zeros(1)}, "resnet20").to_dict(), weights)
    with pytest.raises(ReslabError, match="holds weights only"):
        fit(resume=weights)


def test_policies_are_rebuilt_by_kind_and_only_reslabs_modules_are_imported() -> None:
    assert type(policy_from_record(None)) is TrainPolicy
    rebuilt = policy_from_record(
        {"kind": "finetune", "module": "reslab.transfer", "config": {"source": "a.pt", "freeze": "stages:1"}}
    )
    assert rebuilt.kind == "finetune" and rebuilt.ft.freeze == "stages:1"
    assert rebuilt.record() == {"kind": "finetune", "module": "reslab.transfer", "config": rebuilt.config()}
    with pytest.raises(ReslabError, match="'mine' policy of os; import it before resuming"):
        policy_from_record({"kind": "mine", "module": "os", "config": {}})
    # format 1 recorded the policy as {"finetune": {...}}: read as the same policy
    old = RunCheckpoint.from_dict(
        {"arch": "resnet20", "model": {"w": torch.zeros(1)}, "policy": {"finetune": {"source": "a.pt"}}}
    )
    assert old.policy == {"kind": "finetune", "module": "reslab.transfer", "config": {"source": "a.pt"}}
