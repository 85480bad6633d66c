"""The training engine: ``train_one_epoch``, ``evaluate`` and ``fit``, which only wires them.

Exact resume: the data order and augmentation are functions of (seed, epoch, step), the
learning rate a function of the iteration, and the checkpoint holds the model, optimizer,
scaler, EMA, RNG states and the partial epoch's running sums. A run interrupted at any step
and resumed ends with the same weights as the run left alone (bitwise on CPU).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reslab.config import TrainConfig, load_config, save_config, to_dict
from reslab.engine import distributed as dist
from reslab.engine.runlog import RunLog, epoch_line, plot_curves
from reslab.engine.schedule import lr_factor
from reslab.errors import ReslabError
from reslab.weights import atomic_save, read_file

SMALL_BATCH = 16


class TrainingInterrupted(ReslabError):
    """Raised after an interrupted run has saved its checkpoint; the CLI exits with 130."""


class NonFiniteLoss(ReslabError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class Budget:
    """How long a run trains, in iterations of the global batch it started with.

    Progress is counted in samples, so a run resumed with another number of processes keeps its
    data order and its learning-rate schedule.
    """

    total_iters: int
    global_batch: int

    def position(self, state: TrainState) -> int:
        """Where the schedule is, in iterations of the original global batch."""
        return state.samples // self.global_batch

    def done(self, state: TrainState) -> bool:
        return state.samples >= self.total_iters * self.global_batch


@dataclass
class TrainState:
    """Where a run is: the part of a checkpoint that is not tensors of the model or optimizer."""

    epoch: int = 0  # epochs completed
    step: int = 0  # batches this process did in the current epoch
    iteration: int = 0  # optimizer steps done in all
    samples: int = 0  # training samples seen, over all processes and epochs
    epoch_samples: int = 0  # ... and in the current epoch
    best_err: float = math.inf
    best_iteration: int = -1
    # Running sums of the current epoch: loss, errors, samples, seconds (restored on resume).
    sums: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "err": 0.0, "n": 0.0, "time": 0.0})


class EMA:
    """Exponential moving average of a model's weights (buffers copied), for evaluation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1.0 - self.decay)
            else:
                e.copy_(m)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ReslabError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return device


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, lr_scale: float = 1.0, groups: list[dict[str, Any]] | None = None
) -> torch.optim.Optimizer:
    """SGD or AdamW over ``groups`` (default: all parameters); norm weights and biases optionally
    without weight decay (modern recipes)."""
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


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    cfg: TrainConfig,
    *,
    budget: Budget,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    ema: EMA | None = None,
    log: RunLog | None = None,
    stop: Stop | None = None,
    on_step: Callable[[TrainState], None] | None = None,
) -> bool:
    """Train until the epoch's data runs out (returns True), the budget is spent or a stop is
    requested (returns False); update ``state``.

    ``on_step`` runs after every optimizer step (e.g. a periodic evaluation).
    """
    model.train()
    base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
    world_batch = loader.batch_size * dist.world_size()
    # The per-step NaN check reads one process's loss: alone, and only where the sync is cheap.
    check_every = 1 if device.type == "cpu" and dist.world_size() == 1 else cfg.log_every
    window = {
        "loss": torch.zeros((), device=device, dtype=torch.float64),
        "err": torch.zeros((), device=device, dtype=torch.float64),
        "n": 0,
        "t": time.perf_counter(),
    }
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
        factor = lr_factor(budget.position(state), budget.total_iters, cfg.sched)
        for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = base * factor
        with _autocast(device, cfg.amp):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if ema is not None:
            ema.update(dist.unwrap(model))
        with torch.no_grad():
            n = len(y)
            window["loss"] += loss.detach().double() * n
            window["err"] += (logits.argmax(1) != y).sum().double()
            window["n"] += n
        state.iteration += 1
        state.step += 1
        state.samples += world_batch
        state.epoch_samples += world_batch
        if state.iteration % check_every == 0 and not math.isfinite(window["loss"].item()):
            raise NonFiniteLoss(
                f"the loss became {window['loss'].item()} by iteration {state.iteration}; the last good checkpoint "
                "is kept. Lower optim.lr, add warm-up (sched.warmup_iters=400) or clip gradients (grad_clip=1.0)"
            )
        now = time.perf_counter()
        state.sums["time"] += now - t_step
        t_step = now
        if state.iteration % cfg.log_every == 0 or state.step == steps:
            row = _flush_window(window, state, optimizer, log)
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
            model.train()
        requested = stop is not None and stop.requested
        if dist.world_size() > 1:  # every process must stop after the same step, or collectives desync
            requested = dist.any_flag(requested)
        if budget.done(state) or requested:
            if stop is not None:
                stop.requested = requested
            ran_out = False
            break
    if window["n"]:
        _flush_window(window, state, optimizer, log)
    if bar is not None:
        bar.close()
    return ran_out


def _flush_window(window: dict, state: TrainState, optimizer, log: RunLog | None) -> dict[str, Any] | None:
    """Fold the logging window into the epoch's sums and write (and return) an iteration row."""
    loss, err, n = dist.all_reduce_sum(window["loss"], window["err"], window["n"])
    if not math.isfinite(loss):
        raise NonFiniteLoss(
            f"the loss became {loss} by iteration {state.iteration}; the last good checkpoint is "
            "kept. Lower optim.lr, add warm-up (sched.warmup_iters=400) or clip gradients (grad_clip=1.0)"
        )
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
            "lr": optimizer.param_groups[0]["lr"],
            "img_s": n / max(elapsed, 1e-9),
        }
        if log is not None:
            log.log(row)
    window["loss"].zero_()
    window["err"].zero_()
    window["n"] = 0
    window["t"] = time.perf_counter()
    return row


class EvalStats:
    """Running loss, top-1/top-5 errors and confusion matrix of one model's outputs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.err1 = torch.zeros((), dtype=torch.float64, device=device)
        self.err5 = torch.zeros((), dtype=torch.float64, device=device)
        self.n = 0
        self.confusion: torch.Tensor | None = None

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        logits = logits.float()
        k = logits.shape[1]
        if self.confusion is None:
            self.confusion = torch.zeros(k, k, dtype=torch.int64, device=self.device)
        self.loss += F.cross_entropy(logits, y, reduction="sum").double()
        top = logits.topk(min(5, k), dim=1).indices
        self.err1 += (top[:, 0] != y).sum()
        self.err5 += (~(top == y[:, None]).any(1)).sum()
        self.confusion += torch.bincount(y * k + top[:, 0], minlength=k * k).view(k, k)
        self.n += len(y)

    def result(self) -> dict[str, Any]:
        """Totals over all processes: with several ranks each sample counts exactly once."""
        if self.confusion is None:
            raise ReslabError("evaluation data is empty")
        loss, err1, err5, n = dist.all_reduce_sum(self.loss, self.err1, self.err5, self.n)
        return {
            "loss": loss / n,
            "err": err1 / n,
            "top5_err": err5 / n,
            "n": int(n),
            "confusion": dist.all_reduce_tensor(self.confusion).cpu(),
        }


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "none") -> dict[str, Any]:
    """Loss, top-1/top-5 error and the confusion matrix over every sample of ``loader``."""
    model.eval()
    stats = EvalStats(device)
    for x, y in loader:
        with _autocast(device, amp):
            stats.add(model(x), y)
    return stats.result()


class Stop:
    """Turns the first SIGINT (Ctrl-C) into a request to stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> Stop:
        if threading_main():
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


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress(cfg: TrainConfig, **kwargs):
    if not cfg.progress or not dist.is_main():
        return None
    from tqdm import tqdm

    return tqdm(unit="img", unit_scale=True, leave=False, dynamic_ncols=True, mininterval=0.5, **kwargs)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _all_finite(model: nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in model.state_dict().values() if t.dtype.is_floating_point)


def default_run_dir(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.model}-{cfg.data.name}-{stamp}"


def _code_version() -> str:
    import subprocess

    from reslab import __version__

    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"reslab {__version__}" + (f" (git {commit}{'+dirty' if dirty else ''})" if commit else "")


@dataclass
class RunResult:
    run_dir: Path
    eval_err: float
    eval_loss: float
    eval_split: str
    iterations: int
    train_err: float
    seconds: float
    best_err: float
    summary: dict[str, Any]


def _checkpoint(model, optimizer, scaler, ema, state, cfg, data, meta) -> dict[str, Any]:
    return {
        "model": dist.unwrap(model).state_dict(),
        **meta,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.module.state_dict() if ema is not None else None,
        "state": {k: v for k, v in state.__dict__.items()},
        "rng": _rng_state(next(dist.unwrap(model).parameters()).device),
        "config": to_dict(cfg),
    }


def _open_run(
    cfg: TrainConfig, resume: str | os.PathLike | None
) -> tuple[TrainConfig, Path, dict[str, Any] | None]:
    """The run's config, directory and (when resuming) checkpoint: a resumed run uses its own config."""
    if resume is None:
        run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
        if (run_dir / "last.pt").exists():
            raise ReslabError(
                f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose another --out"
            )
        return cfg, run_dir, None
    run_dir = Path(resume)
    if not (run_dir / "last.pt").exists():
        raise ReslabError(f"{run_dir}: no last.pt to resume from")
    ckpt = read_file(run_dir / "last.pt")
    cfg = load_config(base=ckpt["config"], overrides={"device": cfg.device, "progress": cfg.progress})
    return cfg, run_dir, ckpt


def _report_data(data, ctx: dist.DistContext) -> None:
    if not ctx.is_main:
        return
    if data.skipped:
        print(
            f"reslab: skipped {len(data.skipped)} unreadable image(s), e.g. {data.skipped[0]}",
            file=sys.stderr,
        )
    if data.class_counts and min(data.class_counts) * 1.5 < max(data.class_counts):
        counts = ", ".join(f"{c} {n}" for c, n in zip(data.classes, data.class_counts, strict=True))
        print(
            f"reslab: class imbalance in the training data ({counts}); the error averages over images, "
            "so see the per-class accuracy in eval.json",
            file=sys.stderr,
        )


def _build_model(
    cfg: TrainConfig, data, num_classes: int, model_args: dict[str, Any], fresh: bool, epoch: int
):
    """The network (pretrained and partly frozen when fine-tuning), and its Freezer if any."""
    from reslab.models import create_model

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    ft = cfg.finetune
    if ft is not None and fresh:
        from reslab.transfer import build_finetune_model, load_source

        if not ft.source:
            raise ReslabError(
                "finetune.source is not set: use reslab finetune --from SOURCE (or finetune=null)"
            )
        model = build_finetune_model(
            load_source(ft.source, cfg.model), num_classes, data.in_chans, ft, cfg.model, model_args
        )
    else:
        model = create_model(cfg.model, num_classes=num_classes, in_chans=data.in_chans, **model_args)
    if ft is None:
        return model, None
    from reslab.transfer import Freezer, to_frozen_batchnorm

    freezer = Freezer(model, ft)
    if ft.frozen_bn == "frozen":  # parts that stay frozen for the whole run
        for _, modules in freezer.parts()[: freezer.trainable_from(10**9)]:
            for module in modules:
                to_frozen_batchnorm(module)
    freezer.apply(epoch)
    return model, freezer


def _restore(
    ckpt: dict[str, Any], model, optimizer, scaler, ema, world: int, global_batch: int, device
) -> tuple[TrainState, Budget]:
    """Load a checkpoint's model, optimizer, scaler, EMA, RNG and progress into this run."""
    model.load_state_dict(ckpt["model"])
    fresh_lrs = [(g["lr"], g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("world", 1) != world:  # the learning rate follows this run's global batch
        for g, (lr, initial) in zip(optimizer.param_groups, fresh_lrs, strict=True):
            g["lr"], g["initial_lr"] = lr, initial
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema"):
        ema.module.load_state_dict(ckpt["ema"])
    state = TrainState(**ckpt["state"])
    state.step = state.epoch_samples // global_batch  # this run's batches, when the world size changed
    _set_rng_state(ckpt["rng"], device)
    return state, Budget(**ckpt["budget"])


def _write_header(run_dir: Path, cfg: TrainConfig, device, world: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    with open(run_dir / "command.txt", "a") as f:
        f.write(
            f"{datetime.now().isoformat(timespec='seconds')}  {' '.join(sys.argv)}\n"
            f"  cwd {os.getcwd()}; {_code_version()}; torch {torch.__version__}; device {device}; world {world}\n"
        )


def fit(cfg: TrainConfig, *, resume: str | os.PathLike | None = None) -> RunResult:
    """Train ``cfg.model`` on ``cfg.data`` as ``cfg`` says; resume from a run directory if given."""
    from reslab.data import build_data

    ctx = dist.setup(cfg.device)
    device = ctx.device if ctx.world > 1 else resolve_device(cfg.device)
    cfg, run_dir, ckpt = _open_run(cfg, resume)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    model_args = dict(cfg.model_args)
    data = build_data(
        cfg.data,
        seed=cfg.seed,
        device=device,
        channels=model_args.pop("in_chans", None),
        channels_last=cfg.channels_last,
        rank=ctx.rank,
        world=ctx.world,
        progress=cfg.progress and ctx.is_main,
    )
    num_classes = model_args.pop("num_classes", len(data.classes))
    if num_classes != len(data.classes):
        raise ReslabError(
            f"model_args.num_classes={num_classes} but the data has {len(data.classes)} classes "
            f"({', '.join(data.classes[:5])}{', ...' if len(data.classes) > 5 else ''})"
        )
    _report_data(data, ctx)
    model, freezer = _build_model(
        cfg, data, num_classes, model_args, ckpt is None, ckpt["state"]["epoch"] if ckpt else 0
    )
    model = model.to(device)
    if cfg.sync_bn and ctx.world > 1:
        if device.type != "cuda":
            raise ReslabError(
                "--sync-bn needs GPUs (PyTorch's SyncBatchNorm runs only under CUDA); on CPUs use "
                "a per-process batch of 16 or more"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(cfg.seed + ctx.rank)  # per-rank randomness (dropout, drop-path)

    global_batch = cfg.data.batch_size * ctx.world
    lr_scale = global_batch / 256 if cfg.optim.lr_scaling == "linear" else 1.0
    groups = None
    if freezer is not None:
        head_lr = cfg.finetune.head_lr or cfg.optim.lr
        groups = freezer.param_groups(head_lr, cfg.finetune.base_lr or head_lr / 10, cfg.optim.weight_decay)
    optimizer = build_optimizer(model, cfg, lr_scale, groups)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    steps_per_epoch = len(data.train)
    if steps_per_epoch == 0:
        raise ReslabError(
            f"{data.train.num_samples} training images is less than one batch of {cfg.data.batch_size}; "
            "lower data.batch_size"
        )
    budget = Budget(cfg.iters or math.ceil((cfg.epochs or 1) * steps_per_epoch), global_batch)
    state = TrainState()
    if ckpt is not None:
        state, budget = _restore(ckpt, model, optimizer, scaler, ema, ctx.world, global_batch, device)
    total_epochs = math.ceil(budget.total_iters * budget.global_batch / (steps_per_epoch * global_batch))
    train_model = dist.wrap(model, ctx)
    if cfg.compile:
        train_model = torch.compile(train_model)

    meta = {
        "arch": cfg.model,
        "model_args": model_args,
        "num_classes": num_classes,
        "in_chans": data.in_chans,
        "classes": data.classes,
        "preprocess": data.preprocess,
        "budget": budget.__dict__,
        "world": ctx.world,
    }
    log = None
    if ctx.is_main:
        _write_header(run_dir, cfg, device, ctx.world)
        log = RunLog(run_dir)
        if ckpt is not None:
            log.truncate_after(state.iteration)
        _warn_small_batch(model, cfg.data.batch_size)
        print(
            f"reslab: training {cfg.model} on {data.name} ({data.train.num_samples * ctx.world} train / "
            f"{data.eval.num_samples * ctx.world} {data.eval_split} images, {len(data.classes)} classes) for "
            f"{budget.total_iters} iterations ({total_epochs} epochs) on {device}"
            + (f" x {ctx.world} processes" if ctx.world > 1 else "")
            + f"; run directory {run_dir}"
        )

    def save(name: str) -> None:
        if ctx.is_main:
            if not _all_finite(model):
                raise NonFiniteLoss(
                    f"the weights are no longer finite at iteration {state.iteration}; "
                    f"not saving over {run_dir / name}"
                )
            atomic_save(_checkpoint(model, optimizer, scaler, ema, state, cfg, data, meta), run_dir / name)

    def periodic_eval(st: TrainState) -> None:
        every = cfg.eval_every_iters
        if every and st.iteration % every == 0 and st.step < steps_per_epoch and not budget.done(st):
            ev = evaluate(model, data.eval, device, cfg.amp)
            if log is not None:
                log.log(
                    {
                        "kind": "eval",
                        "iteration": st.iteration,
                        "epoch": st.epoch + 1,
                        "eval_loss": ev["loss"],
                        "eval_err": ev["err"],
                        "eval_top5_err": ev["top5_err"],
                    }
                )

    t0 = time.perf_counter()
    last_row: dict[str, Any] = {}
    last_eval: dict[str, Any] | None = None
    try:
        with Stop() as stop:
            while not budget.done(state):
                if freezer is not None:
                    trainable = freezer.apply(state.epoch)
                    if ctx.is_main and (state.epoch == 0 or state.epoch in dict(freezer.events)):
                        print(f"reslab: epoch {state.epoch + 1}: training {', '.join(trainable)}", flush=True)
                data.train.set_epoch(state.epoch, state.epoch_samples)
                ran_out = train_one_epoch(
                    train_model,
                    data.train,
                    optimizer,
                    state,
                    cfg,
                    budget=budget,
                    device=device,
                    scaler=scaler,
                    ema=ema,
                    log=log,
                    stop=stop,
                    on_step=periodic_eval,
                )
                stop.requested = dist.any_flag(stop.requested)
                finished_epoch = ran_out or budget.done(state)
                if finished_epoch:
                    last_row, ev = _end_epoch(
                        model, ema, data, state, cfg, optimizer, budget, device, log, total_epochs, save
                    )
                    last_eval = ev or last_eval
                if stop.requested:
                    save("last.pt")
                    raise TrainingInterrupted(
                        f"interrupted at epoch {state.epoch + (0 if finished_epoch else 1)}, iteration "
                        f"{state.iteration}/{budget.total_iters}: saved {run_dir / 'last.pt'}; resume with: "
                        f"reslab train --resume {run_dir}"
                    )
    finally:
        if log is not None:
            log.close()
    if last_eval is None or last_row.get("iteration") != state.iteration:  # e.g. a finished run resumed
        last_eval = evaluate(model, data.eval, device, cfg.amp)
        last_row = {
            **last_row,
            "eval_err": last_eval["err"],
            "eval_loss": last_eval["loss"],
            "eval_top5_err": last_eval["top5_err"],
            "train_err": last_row.get("train_err", math.nan),
        }
    return _finish(run_dir, cfg, data, state, last_row, last_eval, device, ctx, time.perf_counter() - t0)


def _finish(
    run_dir: Path,
    cfg: TrainConfig,
    data,
    state: TrainState,
    last_row: dict[str, Any],
    last_eval: dict[str, Any],
    device,
    ctx: dist.DistContext,
    seconds: float,
) -> RunResult:
    """The final evaluation report, summary.json and the curves."""
    from reslab.inference import eval_report

    report = eval_report(
        last_eval,
        data.classes,
        run_dir if ctx.is_main else None,
        f"{cfg.model} on {data.name} {data.eval_split}: {100 * last_eval['err']:.2f}% error",
    )
    summary = {
        "model": cfg.model,
        "data": data.name,
        "eval_split": data.eval_split,
        "iterations": state.iteration,
        "epochs": state.epoch,
        "eval_err": last_row["eval_err"],
        "eval_loss": last_row["eval_loss"],
        "eval_top5_err": last_row.get("eval_top5_err"),
        "train_err": last_row["train_err"],
        "best_eval_err": state.best_err,
        "best_iteration": state.best_iteration,
        "train_seconds": state.sums.get("total_time", seconds),
        "device": str(device),
        "world": ctx.world,
        "per_class_acc": report["per_class_acc"],
        "confusion_png": report.get("confusion_png"),
    }
    if ctx.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        plot_curves(run_dir, title=f"{cfg.model} on {data.name}", split=data.eval_split)
    return RunResult(
        run_dir,
        last_row["eval_err"],
        last_row["eval_loss"],
        data.eval_split,
        state.iteration,
        last_row["train_err"],
        seconds,
        state.best_err,
        summary,
    )


def _end_epoch(
    model, ema, data, state, cfg, optimizer, budget, device, log, total_epochs, save
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Close an epoch: its summary row, an evaluation when due, best.pt and last.pt."""
    sums = state.sums
    row = {
        "kind": "epoch",
        "epoch": state.epoch + 1,
        "iteration": state.iteration,
        "train_loss": sums["loss"] / max(1, sums["n"]),
        "train_err": sums["err"] / max(1, sums["n"]),
        "lr": optimizer.param_groups[0]["lr"],
        "epoch_time_s": sums["time"],
        "img_s": sums["n"] / max(sums["time"], 1e-9),
        "eval_loss": None,
        "eval_err": None,
        "eval_top5_err": None,
        "ema_eval_err": None,
    }
    state.epoch += 1
    state.step = state.epoch_samples = 0
    total_time = sums.get("total_time", 0.0) + sums["time"]
    state.sums = {"loss": 0.0, "err": 0.0, "n": 0.0, "time": 0.0, "total_time": total_time}
    ev = None
    if state.epoch % cfg.eval_every == 0 or budget.done(state):
        ev = evaluate(model, data.eval, device, cfg.amp)
        row.update(eval_loss=ev["loss"], eval_err=ev["err"], eval_top5_err=ev["top5_err"])
        if ema is not None:
            row["ema_eval_err"] = evaluate(ema.module, data.eval, device, cfg.amp)["err"]
        if ev["err"] < state.best_err:
            state.best_err, state.best_iteration = ev["err"], state.iteration
            save("best.pt")
    if log is not None:
        log.log(row)
        print(epoch_line(row, total_epochs, data.eval_split), flush=True)
    save("last.pt")
    return row, ev


def _warn_small_batch(model: nn.Module, batch: int) -> None:
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and batch < SMALL_BATCH:
        warnings.warn(
            f"per-device batch {batch} < {SMALL_BATCH}: BatchNorm's batch statistics get noisy and its running "
            "averages drift from what the model sees in training, which hurts accuracy. Options: a larger batch "
            "(gradient accumulation does not help BN), --sync-bn across processes, frozen BN statistics when "
            "fine-tuning, or GroupNorm (model_args.norm_layer).",
            stacklevel=2,
        )
