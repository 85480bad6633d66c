"""Run under torchrun by tests/test_distributed.py: small distributed jobs on CPU with gloo."""

from __future__ import annotations

import json
import os
import sys

import torch


def gradient_step(out: str, batch: int) -> None:
    """One DDP training step of ResNet-20 on a fixed batch split across ranks. BN in eval mode (its
    running statistics), so the step does not depend on how the batch is split; SyncBatchNorm, the
    other way to get this, needs GPUs in PyTorch."""
    from torch import nn

    from reslab import create_model
    from reslab.engine import distributed as dist

    ctx = dist.setup("cpu")
    torch.manual_seed(0)
    x, y = torch.randn(2 * batch, 3, 32, 32), torch.randint(0, 10, (2 * batch,))
    model = create_model("resnet20").eval()
    world = ctx.world
    ddp = dist.wrap(model, ctx)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    per = 2 * batch // world
    xs, ys = x[ctx.rank * per : (ctx.rank + 1) * per], y[ctx.rank * per : (ctx.rank + 1) * per]
    loss = nn.functional.cross_entropy(ddp(xs), ys)
    loss.backward()
    opt.step()
    if ctx.is_main:
        torch.save({k: v for k, v in dist.unwrap(ddp).state_dict().items()}, out)
    dist.shutdown()


def fail_on_rank(rank: int) -> None:
    """Training where one rank raises mid-run: the job must end, not hang."""
    import reslab.engine.train as train
    from reslab.cli import main

    original = train.lr_factor

    def boom(it, total, cfg):
        if it == 3 and int(os.environ["RANK"]) == rank:
            raise RuntimeError(f"simulated failure on rank {rank}")
        return original(it, total, cfg)

    train.lr_factor = boom
    raise SystemExit(main(sys.argv[3:]))


def evaluate_count(n: int) -> None:
    """Distributed evaluation over n samples: every sample must count exactly once."""
    from reslab.data import Placement, TensorLoader
    from reslab.engine import distributed as dist
    from reslab.engine import evaluate

    ctx = dist.setup("cpu")
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(n) % 3
    loader = TensorLoader(
        images,
        labels,
        batch_size=4,
        train=False,
        mean=(0.5,),
        std=(0.5,),
        place=Placement(rank=ctx.rank, world=ctx.world),
    )
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    torch.manual_seed(0)
    result = evaluate(model, loader, torch.device("cpu"))
    if ctx.is_main:
        print(json.dumps({"n": result["n"], "confusion_total": int(result["confusion"].sum())}))
    dist.shutdown()


if __name__ == "__main__":
    job = sys.argv[1]
    if job == "step":
        gradient_step(sys.argv[2], int(sys.argv[3]))
    elif job == "fail":
        fail_on_rank(int(sys.argv[2]))
    elif job == "eval":
        evaluate_count(int(sys.argv[2]))
