"""The capturable training step: the same arithmetic as the eager step (compared on the CPU, where
it runs uncaptured), checkpoints that resume across the two, and the capture itself on CUDA."""

from __future__ import annotations

import contextlib
import sys
from functools import partial

import pytest
import torch

from reslab import create_model
from reslab.config import load_config
from reslab.engine import TrainStep, build_optimizer, fit
from reslab.engine.graphs import CapturedStep, graph_blockers
from reslab.engine.train import EMA, SIGINT_AT
from reslab.errors import TrainingInterrupted
from reslab.weights import read_file

FEATURES = {
    "sgd-nesterov-wd-smoothing-clip": {"optim.nesterov": True, "label_smoothing": 0.1, "grad_clip": 0.5},
    "sgd-ema": {"optim.weight_decay": 5e-4, "ema_decay": 0.9},
    "adamw": {"optim.name": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 0.05},
    "sgd-no-decay-on-norms": {"optim.decay_norm_and_bias": False, "optim.momentum": 0.0},
}


def _pair(cfg, device):
    """An eager and a capturable step on two copies of one network."""
    steps = []
    for cls, options in ((TrainStep, {}), (CapturedStep, {"capture": device.type == "cuda"})):
        torch.manual_seed(0)
        model = create_model("resnet20").to(device)
        ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
        steps.append(cls(model, build_optimizer(model, cfg), cfg, device, ema=ema, **options))
    return steps


def _sync(src: TrainStep, dst: TrainStep) -> None:
    """Make ``dst`` the same state as ``src``: float order aside, a step then gives the same result,
    and differences do not compound (an untrained network magnifies a 1-ulp difference a
    thousandfold within a few steps, BatchNorm and Adam's normalisation most)."""
    with torch.no_grad():  # in place: a captured graph holds these very tensors
        for a, b in zip(src.model.state_dict().values(), dst.model.state_dict().values(), strict=True):
            b.copy_(a)
        for p, q in zip(src.model.parameters(), dst.model.parameters(), strict=True):
            for key, value in src.optimizer.state[p].items():
                dst.optimizer.state[q][key].copy_(value)
        if src.ema is not None:
            for a, b in zip(
                src.ema.module.state_dict().values(), dst.ema.module.state_dict().values(), strict=True
            ):
                b.copy_(a)


def _close(a: dict, b: dict) -> None:
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-5, atol=2e-6, msg=k)


@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
def test_capturable_step_equals_the_eager_step_on_cpu(features) -> None:
    cfg = load_config(overrides={"amp": "none", **features})
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(5)
    ]
    eager, captured = _pair(cfg, torch.device("cpu"))
    assert not captured.capture  # on the CPU the capturable step runs uncaptured
    start = {k: v.clone() for k, v in eager.model.state_dict().items()}
    for i, (x, y) in enumerate(batches):
        for step in (eager, captured):
            step.set_lr(0.5 + 0.5 * i / len(batches))  # the schedule moves the rate between steps
            step(x, y)
        _close(eager.model.state_dict(), captured.model.state_dict())
        if eager.ema is not None:
            _close(eager.ema.module.state_dict(), captured.ema.module.state_dict())
        torch.testing.assert_close(captured.sums, eager.sums, rtol=1e-6, atol=1e-5)  # loss and error sums
        # the optimizer state has torch.optim's layout, whichever step wrote it
        sa, sb = (
            {k: v for k, v in s.optimizer.state_dict()["state"].items() if v} for s in (eager, captured)
        )
        assert sa.keys() == sb.keys() and all(sa[k].keys() == sb[k].keys() for k in sa)
        for k in sa:
            _close(sa[k], sb[k])
        _sync(eager, captured)
    assert not torch.allclose(eager.model.state_dict()["conv1.weight"], start["conv1.weight"])  # it trained


def test_the_capturable_updates_are_torch_optims_updates() -> None:
    """Given the same gradients, the foreach updates with a tensor learning rate give torch.optim's
    SGD (momentum, Nesterov, weight decay) and AdamW results, step after step."""
    from reslab.engine.graphs import adamw_update, sgd_update

    torch.manual_seed(0)
    for make, update in (
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True), sgd_update),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4), sgd_update),
        (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.05), adamw_update),
    ):
        a = [torch.randn(7, requires_grad=True), torch.randn(3, 2, requires_grad=True)]
        b = [p.detach().clone().requires_grad_(True) for p in a]
        opt_a, opt_b = make(a), make(b)
        for _ in range(5):
            for p, q in zip(a, b, strict=True):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            opt_a.step()
            with torch.no_grad():
                group = opt_b.param_groups[0]
                update(b, [q.grad for q in b], opt_b.state, group, torch.tensor(group["lr"]))
            for p, q in zip(a, b, strict=True):
                torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)  # the last bit, at most


TINY = {
    "data.limit_train": 320,
    "data.limit_test": 100,
    "data.batch_size": 32,
    "progress": False,
    "log_every": 4,
    "sched.name": "cosine",
    "optim.lr": 0.05,
    "optim.nesterov": True,
    "epochs": 2,
    "device": "cpu",  # the uncaptured capturable step: CPU arithmetic, also on GPU machines
}


def _final(path):
    return read_file(path)["model"]


def _with_graphs(choice: str, **kw):
    """load_config, with the step type of a resumed run overridden (its config says the other)."""
    return load_config(**{**kw, "overrides": {**kw["overrides"], "cuda_graphs": choice}})


def test_checkpoints_resume_across_graphed_and_eager_steps(tmp_path, monkeypatch) -> None:
    """A run interrupted with the capturable step resumes exactly with it (bitwise the uninterrupted
    run) and resumes into the eager step too: one step on from the checkpoint, both continuations
    agree up to float order, optimizer state included (the state carries over, it is not reset)."""
    import shutil

    def run(name, graphs):
        return fit(load_config(overrides={**TINY, "cuda_graphs": graphs, "out": str(tmp_path / name)}))

    def resume(name, graphs, stop_at=None):
        if stop_at:
            monkeypatch.setenv(SIGINT_AT, str(stop_at))
        monkeypatch.setattr(sys.modules["reslab.engine.fit"], "load_config", partial(_with_graphs, graphs))
        with contextlib.suppress(TrainingInterrupted):  # stopped one step on, as asked
            fit(resume=tmp_path / name, progress=False)
        monkeypatch.undo()

    with pytest.warns(UserWarning, match="capturable step runs uncaptured"):
        straight = run("straight", "on")
    monkeypatch.setenv(SIGINT_AT, "13")  # mid-epoch 2 (10 steps per epoch)
    with pytest.raises(TrainingInterrupted):
        run("cut", "on")
    monkeypatch.delenv(SIGINT_AT)
    for other in ("to-eager", "to-graphed"):
        shutil.copytree(tmp_path / "cut", tmp_path / other)
    resume("cut", "on")  # to the end, with the step it started with
    for k, v in _final(straight.run_dir / "last.pt").items():
        assert torch.equal(_final(tmp_path / "cut" / "last.pt")[k], v), k
    resume("to-eager", "off", stop_at=14)  # one step on, each way
    resume("to-graphed", "on", stop_at=14)
    a, b = (read_file(tmp_path / d / "last.pt") for d in ("to-eager", "to-graphed"))
    assert a["state"]["iteration"] == b["state"]["iteration"] == 14
    assert (a["config"]["cuda_graphs"], b["config"]["cuda_graphs"]) == ("off", "on")
    _close(b["model"], a["model"])
    for k, state in a["optimizer"]["state"].items():
        _close(b["optimizer"]["state"][k], state)


def test_what_blocks_capture_is_said() -> None:
    cfg = load_config(overrides={"amp": "fp16", "compile": "on"})
    reasons = graph_blockers(cfg, torch.device("cpu"), static_batches=False, world=2)
    assert len(reasons) == 5 and any("GradScaler" in r for r in reasons) and any("DDP" in r for r in reasons)
    assert (
        graph_blockers(
            load_config(overrides={"amp": "bf16"}), torch.device("cuda"), static_batches=True, world=1
        )
        == []
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the capture itself")
def test_captured_step_on_cuda_matches_eager() -> None:
    """Replays of the captured graph step like the eager step (synchronised in place after each step)."""
    cfg = load_config(overrides={"amp": "none", "tf32": False, "optim.nesterov": True, "ema_decay": 0.9})
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(8)
    ]
    eager, captured = _pair(cfg, device)
    for i, (x, y) in enumerate(batches):
        for step in (eager, captured):
            step.set_lr(0.5 + 0.5 * i / len(batches))
            step(x.to(device), y.to(device))
        if i >= 3:  # the warm-up steps are eager; from the fourth on the graph is replayed
            assert captured.graph is not None
        sa, sb = eager.model.state_dict(), captured.model.state_dict()
        for k, v in sa.items():
            torch.testing.assert_close(sb[k], v, rtol=1e-4, atol=1e-5, msg=k)
        _sync(eager, captured)
