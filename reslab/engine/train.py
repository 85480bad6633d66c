"""Training: the optimizer, the step, and the epoch (``train_one_epoch``).

The learning rate is a function of the iteration (``schedule.lr_factor``), the data order and
augmentation functions of (seed, epoch, step): a run interrupted at any step and resumed ends
with the same weights as the run left alone (bitwise on CPU).
"""

from __future__ import annotations

import copy
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from reslab.config import TrainConfig
from reslab.data import Loader
from reslab.engine import distributed as dist
from reslab.engine.checkpoint import Budget, TrainState
from reslab.engine.device import autocast
from reslab.engine.schedule import lr_factor
from reslab.errors import NonFiniteLoss

# A run sends itself a real Ctrl-C when it reaches this iteration: interruptions reproduced
# exactly (tests; a signal from outside may arrive after a short run has already ended).
SIGINT_AT = "RESLAB_SIGINT_AT_ITERATION"


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, lr_scale: float = 1.0, groups: list[dict[str, Any]] | None = None
) -> torch.optim.Optimizer:
    """SGD or AdamW over ``groups`` (default: all trainable parameters); norm weights and biases
    optionally without weight decay (modern recipes)."""
    o = cfg.optim
    groups = groups or [
        {"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": o.weight_decay}
    ]
    if not o.decay_norm_and_bias:  # split each group into its decayed and its 1-D parameters
        groups = [
            {
                **g,
                "params": [p for p in g["params"] if (p.ndim <= 1) == nd],
                **({"weight_decay": 0.0} if nd else {}),
            }
            for g in groups
            for nd in (False, True)
        ]
        groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = g.get("lr", o.lr) * lr_scale
    lr = o.lr * lr_scale
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov)
    return torch.optim.AdamW(groups, lr=lr, betas=o.betas)


def logged_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate logs show: the last parameter group's (the only one in plain training;
    the head's when fine-tuning, whose frozen stem comes first)."""
    return optimizer.param_groups[-1]["lr"]


class EMA:
    """Exponential moving average of a model's weights (buffers copied), for evaluation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values(), strict=True))
        floats = [(e, m) for e, m in pairs if e.dtype.is_floating_point]
        torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1.0 - self.decay)
        for e, m in pairs:
            if not e.dtype.is_floating_point:  # step counters are copied
                e.copy_(m)


class TrainStep:
    """One optimizer step on a batch: forward, loss, backward, clipping, update and EMA.

    The loss and error sums of the steps since they were last read and zeroed stay on the device,
    so a step never waits for the device unless a caller reads them.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        device: torch.device,
        scaler: torch.amp.GradScaler | None = None,
        ema: EMA | None = None,
    ) -> None:
        self.model, self.optimizer, self.cfg, self.device = model, optimizer, cfg, device
        self.scaler, self.ema = scaler, ema
        self.base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss * samples, errors

    def set_lr(self, factor: float) -> None:
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * factor

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        cfg, opt, scaler = self.cfg, self.optimizer, self.scaler
        logits, loss = self.forward(x, y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        self.after_update(logits, loss, y)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and loss of a batch, under the run's autocast."""
        with autocast(self.device, self.cfg.amp):
            logits = self.model(x)
            return logits, F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)

    @torch.no_grad()
    def after_update(self, logits: torch.Tensor, loss: torch.Tensor, y: torch.Tensor) -> None:
        """EMA update and the running loss/error sums, on the device."""
        if self.ema is not None:
            self.ema.update(dist.unwrap(self.model))
        self.sums[0] += loss.detach().double() * len(y)
        self.sums[1] += (logits.argmax(1) != y).sum()


class Stop:
    """Turns the first SIGINT (Ctrl-C) into a request to stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> Stop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nreslab: stopping after this step to save a checkpoint (Ctrl-C again to abort)", file=sys.stderr
        )

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _progress(cfg: TrainConfig, **kwargs):
    if not cfg.progress or not dist.is_main():
        return None
    return tqdm(unit="img", unit_scale=True, leave=False, dynamic_ncols=True, mininterval=0.5, **kwargs)


def _not_finite(value: float, iteration: int) -> NonFiniteLoss:
    return NonFiniteLoss(
        f"the loss became {value} by iteration {iteration}. Lower optim.lr, add warm-up "
        "(sched.warmup_iters=400) or clip gradients (grad_clip=1.0)"
    )


def train_one_epoch(
    step: TrainStep,
    loader: Loader,
    state: TrainState,
    cfg: TrainConfig,
    *,
    budget: Budget,
    log: Callable[[dict[str, Any]], None] | None = None,
    stop: Stop | None = None,
    on_step: Callable[[TrainState], None] | None = None,
    train_mode: Callable[[nn.Module], Any] | None = None,
) -> bool:
    """Train until the epoch's data runs out (returns True), the budget is spent or a stop is
    requested (returns False); update ``state``.

    ``on_step`` runs after every optimizer step (e.g. a periodic evaluation); ``train_mode`` puts
    the model into training mode (default ``model.train()``; fine-tuning keeps frozen BN in eval).
    """
    train_mode = train_mode or (lambda m: m.train())
    train_mode(step.model)
    sigint_at = int(os.environ.get(SIGINT_AT, -1))
    world_batch = loader.batch_size * dist.world_size()
    # The per-step NaN check reads one process's loss: alone, and only where the sync is cheap.
    check_every = 1 if step.device.type == "cpu" and dist.world_size() == 1 else cfg.log_every
    window = {"n": 0, "t": time.perf_counter()}
    steps = len(loader)
    bar = _progress(
        cfg,
        total=steps * loader.batch_size,
        initial=state.step * loader.batch_size,
        desc=f"epoch {state.epoch + 1}",
    )
    t_step = time.perf_counter()
    ran_out = True
    for x, y in loader:
        step.set_lr(lr_factor(budget.position(state), budget.total_iters, cfg.sched))
        step(x, y)
        n = len(y)
        window["n"] += n
        state.iteration += 1
        state.step += 1
        state.samples += world_batch
        state.epoch_samples += world_batch
        if state.iteration == sigint_at:
            os.kill(os.getpid(), signal.SIGINT)
        if state.iteration % check_every == 0 and not math.isfinite(step.sums[0].item()):
            raise _not_finite(step.sums[0].item(), state.iteration)
        now = time.perf_counter()
        state.sums["time"] += now - t_step
        t_step = now
        if state.iteration % cfg.log_every == 0 or state.step == steps:
            row = _flush_window(step, window, state, log)
            if bar is not None and row:
                bar.set_postfix(
                    loss=f"{row['train_loss']:.3f}",
                    err=f"{100 * row['train_err']:.1f}%",
                    lr=f"{row['lr']:.3g}",
                    refresh=False,
                )
        if bar is not None:
            bar.update(n)
        if on_step is not None:
            on_step(state)
            train_mode(step.model)
        requested = stop is not None and stop.requested
        if dist.world_size() > 1:  # every process must stop after the same step, or collectives desync
            requested = dist.any_flag(requested)
        if budget.done(state) or requested:
            if stop is not None:
                stop.requested = requested
            ran_out = False
            break
    if window["n"]:
        _flush_window(step, window, state, log)
    if bar is not None:
        bar.close()
    return ran_out


def _flush_window(
    step: TrainStep, window: dict, state: TrainState, log: Callable[[dict[str, Any]], None] | None
) -> dict[str, Any] | None:
    """Fold the logging window into the epoch's sums and write (and return) an iteration row."""
    loss, err, n = dist.all_reduce_sum(step.sums[0], step.sums[1], window["n"])
    step.sums.zero_()
    if not math.isfinite(loss):
        raise _not_finite(loss, state.iteration)
    state.sums["loss"] += loss
    state.sums["err"] += err
    state.sums["n"] += n
    elapsed = time.perf_counter() - window["t"]
    row = None
    if n:
        row = {
            "kind": "iter",
            "iteration": state.iteration,
            "epoch": state.epoch + 1,
            "train_loss": loss / n,
            "train_err": err / n,
            "lr": logged_lr(step.optimizer),
            "img_s": n / max(elapsed, 1e-9),
        }
        if log is not None:
            log(row)
    window["n"] = 0
    window["t"] = time.perf_counter()
    return row
