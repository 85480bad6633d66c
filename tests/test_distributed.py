"""Distributed data parallel on this machine's CPUs: torchrun, gloo, two processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from reslab.engine.train import SIGINT_AT
from reslab.weights import read_file

HELPER = str(Path(__file__).parent / "helpers" / "ddp_worker.py")
TINY = [
    "data.limit_train=1024",
    "data.limit_test=200",
    "data.batch_size=32",
    "log_every=2",
    "optim.lr=0.1",
    "sched.name=cosine",
    "sched.warmup_iters=3",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: float = 300, env: dict[str, str] | None = None):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={_port()}",
        "--master-addr=127.0.0.1",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESLAB_DIST_TIMEOUT": "60", **(env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_processes_take_the_same_step_as_one_with_twice_the_batch(tmp_path) -> None:
    one = torchrun(1, HELPER, "step", str(tmp_path / "one.pt"), "8")
    two = torchrun(2, HELPER, "step", str(tmp_path / "two.pt"), "8")
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].dtype.is_floating_point)
    assert worst < 1e-5, worst


def test_evaluation_counts_every_sample_once() -> None:
    proc = torchrun(2, HELPER, "eval", "11")  # 11 samples: an uneven split
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"n": 11, "confusion_total": 11}


def test_two_process_training_then_resume_with_one(tmp_path) -> None:
    base = ["-m", "reslab", "train", "--no-progress", "--epochs", "3", "--device", "cpu"]
    # Two processes, each given a real Ctrl-C at iteration 12 (as a terminal sends it to the whole
    # process group), mid-run: 16 iterations per epoch.
    proc = torchrun(2, *base, "--out", str(tmp_path / "two"), *TINY, "log_every=1", env={SIGINT_AT: "12"})
    assert proc.stderr.count("resume with: reslab train --resume") == 1, proc.stderr[-3000:]  # rank 0 only
    ckpt = read_file(tmp_path / "two" / "last.pt")
    assert ckpt["world"] == 2 and ckpt["state"]["iteration"] == 12 and ckpt["state"]["samples"] == 12 * 64
    written = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert written.count("metrics.jsonl") == 1 and all(
        ".tmp" not in name for name in written
    )  # rank 0 writes
    done = subprocess.run(
        [sys.executable, "-m", "reslab", "train", "--resume", str(tmp_path / "two"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world"] == 1 and two["epochs"] == 3
    # Learns (10 digits: chance is 90% error); that two processes take one process's step with
    # twice the batch is checked exactly above.
    assert two["eval_err"] < 0.5
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and epochs[-1]["train_loss"] < epochs[0]["train_loss"]


def test_a_failing_rank_ends_the_job(tmp_path) -> None:
    proc = torchrun(
        2,
        HELPER,
        "fail",
        "1",
        "train",
        "--no-progress",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "f"),
        *TINY,
        timeout=240,  # a hang guard: with this collective timeout, only the failure itself ends the job
        env={"RESLAB_DIST_TIMEOUT": "3600"},
    )
    assert proc.returncode != 0
    assert "simulated failure on rank 1" in proc.stderr
