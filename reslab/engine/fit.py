"""``fit``: wire data, model, step and run directory into a training run, epoch after epoch.

Everything a run needs lives on one :class:`Run`, which ``fit`` opens, trains and finishes. The
engine owns resuming: ``fit(resume=RUN)`` reads the run's checkpoint once and rebuilds everything
from it, the training policy included. Anything beyond plain training (fine-tuning's pretrained
weights, frozen and unfrozen stages) comes in through a :class:`TrainPolicy`, recorded in the
checkpoint by kind; the engine knows nothing of any particular one.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from reslab.config import TrainConfig, json_text, load_config, to_dict
from reslab.data import Data, Placement, TensorLoader, build_data, data_fingerprint, resolve_paths
from reslab.engine import distributed as dist
from reslab.engine.checkpoint import (
    BEST,
    LAST,
    Budget,
    RunCheckpoint,
    TrainState,
    read_run_checkpoint,
    resume_file,
    save_run_checkpoint,
)
from reslab.engine.device import for_device, resolve_device, rng_state, set_rng_state
from reslab.engine.evaluate import eval_report, evaluate
from reslab.engine.graphs import CapturedStep, graph_blockers, make_step
from reslab.engine.rundir import RunLog, code_version, default_run_dir, epoch_line, plot_curves, write_header
from reslab.engine.train import EMA, Stop, TrainStep, build_optimizer, logged_lr, train_one_epoch
from reslab.errors import NonFiniteLoss, ReslabError, TrainingInterrupted
from reslab.models import create_model

SMALL_BATCH = 16


class TrainPolicy:
    """Plain training: a fresh model, one parameter group, every part trained. Subclasses change
    any of these steps, name their ``kind`` and say how to rebuild themselves
    (:meth:`config`, :meth:`from_config`): checkpoints record them, so ``fit(resume=...)`` rebuilds
    the policy a run was trained with."""

    kind: ClassVar[str] = "plain"
    _kinds: ClassVar[dict[str, type[TrainPolicy]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        TrainPolicy._kinds[cls.kind] = cls

    def build_model(self, cfg: TrainConfig, data: Data, model_args: dict[str, Any], fresh: bool) -> nn.Module:
        """The network to train (``fresh``: a new run; otherwise a resumed run loads its weights)."""
        return create_model(cfg.model, in_chans=data.in_chans, **model_args)

    def param_groups(self, model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups (None: all trainable parameters at ``optim.lr``)."""
        return None

    def start_epoch(self, epoch: int, model: nn.Module) -> str | None:
        """Called before each epoch (0-based); returns a line for the console, if any."""
        return None

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def config(self) -> dict[str, Any]:
        """Plain data that :meth:`from_config` rebuilds this policy from."""
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrainPolicy:
        return cls()

    def record(self) -> dict[str, Any] | None:
        """What a checkpoint records of the policy (None for plain training)."""
        if type(self) is TrainPolicy:
            return None
        return {"kind": self.kind, "module": type(self).__module__, "config": self.config()}


def policy_from_record(record: dict[str, Any] | None, source: str = "checkpoint") -> TrainPolicy:
    """The policy a checkpoint was trained with. Its module is imported when it is one of reslab's
    (a checkpoint never makes reslab import anything else)."""
    if not record:
        return TrainPolicy()
    kind, module = record["kind"], record.get("module", "")
    if kind not in TrainPolicy._kinds and module.split(".")[0] == "reslab":
        importlib.import_module(module)
    if kind not in TrainPolicy._kinds:
        raise ReslabError(
            f"{source}: trained with the {kind!r} policy of {module or 'an unknown module'}; import it "
            "before resuming"
        )
    return TrainPolicy._kinds[kind].from_config(record.get("config") or {})


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
    is_main: bool = True  # the process that reports (rank 0 under torchrun)


@dataclass
class Run:
    """A training run in progress: its config, data, model, step, progress and outputs."""

    cfg: TrainConfig  # with its "auto" settings resolved for this device
    asked: TrainConfig  # as given: what checkpoints record, so a resumed run resolves "auto" anew
    run_dir: Path
    ctx: dist.DistContext
    device: torch.device
    data: Data
    model: nn.Module  # the user's model (the step may hold it wrapped in DDP or compiled)
    step: TrainStep
    state: TrainState
    budget: Budget
    policy: TrainPolicy
    settings: dict[str, Any]  # what the run actually uses (device, precision, TF32, graphs, ...)
    log: RunLog | None = None
    on_log: Callable[[dict[str, Any]], None] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data.train)

    @property
    def total_epochs(self) -> int:
        b = self.budget
        return math.ceil(
            b.total_iters
            * b.global_batch
            / (self.steps_per_epoch * self.ctx.world * self.cfg.data.batch_size)
        )

    def checkpoint(self) -> RunCheckpoint:
        step, data = self.step, self.data
        return RunCheckpoint(
            model=self.model.state_dict(),
            arch=self.cfg.model,
            model_args={k: v for k, v in self.cfg.model_args.items() if k not in ("num_classes", "in_chans")},
            num_classes=len(data.classes),
            in_chans=data.in_chans,
            classes=data.classes,
            preprocess=data.preprocess.to_dict(),
            config=to_dict(self.asked),
            policy=self.policy.record(),
            state=self.state,
            budget=self.budget,
            optimizer=step.optimizer.state_dict(),
            scaler=step.scaler.state_dict() if step.scaler is not None else None,
            ema=step.ema.module.state_dict() if step.ema is not None else None,
            rng=rng_state(self.device),
            world=self.ctx.world,
            settings=self.settings,
            code_version=self.settings["code_version"],
        )

    def save(self, name: str) -> None:
        if self.ctx.is_main:
            save_run_checkpoint(self.checkpoint(), self.run_dir / name)

    def log_row(self, row: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.log(row)
        if self.on_log is not None:
            self.on_log(row)

    def evaluate(self, model: nn.Module | None = None) -> dict[str, Any]:
        return evaluate(model or self.model, self.data.eval, self.device, self.cfg.amp)

    def kept(self) -> str:
        """What a failed run leaves behind, for its error message."""
        last = self.run_dir / LAST
        return (
            f"the last good checkpoint is kept: {last}" if last.exists() else "no checkpoint was written yet"
        )


def fit(
    cfg: TrainConfig | None = None,
    *,
    resume: str | os.PathLike | None = None,
    policy: TrainPolicy | None = None,
    device: str | None = None,
    progress: bool | None = None,
    iters: int | None = None,
    epochs: float | None = None,
    data_dir: str | os.PathLike | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train ``cfg.model`` on ``cfg.data`` as ``cfg`` says, or continue the run ``resume`` names
    (its directory or a checkpoint in it) exactly where it stopped, with the config and training
    policy its checkpoint records. ``policy`` changes how a new run's model is built and trained
    (fine-tuning).

    What may change when a run continues is said explicitly: ``device``, ``progress``, a new
    budget (``iters`` or ``epochs``, counted from the start of the run), and ``data_dir`` for data
    that moved (it must be the same data: the same class folders and files). Runs record their
    folders as absolute paths, so they continue and evaluate from any working directory.
    ``on_log`` receives every metrics row as it is written. Under torchrun every process calls ``fit``: it joins the process
    group and leaves it, and only rank 0 writes (``RunResult.is_main``).
    """
    changes = {k: v for k, v in (("device", device), ("progress", progress)) if v is not None}
    budget = {"iters": iters, "epochs": epochs} if iters is not None or epochs is not None else {}
    ckpt, run_dir = None, None
    if resume is not None:
        if cfg is not None or policy is not None:
            raise ReslabError(
                "a resumed run continues with the config and policy its checkpoint records; pass "
                "what changes as keywords (device, progress, iters, epochs)"
            )
        file = resume_file(resume)
        ckpt, run_dir = read_run_checkpoint(file), file.parent
        _check_resumable(file, ckpt, bool(budget))
        moved = {"data.dir": str(Path(data_dir).resolve())} if data_dir is not None else {}
        cfg = load_config(base=ckpt.config or {}, overrides={**changes, **budget, **moved})
        if moved:
            _check_same_data(cfg, ckpt, file)
        policy = policy_from_record(ckpt.policy, str(file))
    elif cfg is None:
        raise ReslabError("fit needs a config (reslab.config.load_config) or resume=RUN_DIR")
    else:
        cfg = dataclasses.replace(cfg, **changes, **budget, data=resolve_paths(cfg.data))
        if data_dir is not None:
            raise ReslabError("data_dir= points a resumed run at moved data; a new run sets cfg.data.dir")
    with dist.session(cfg.device) as ctx:
        run = _open(cfg, ctx, policy or TrainPolicy(), ckpt, run_dir, new_budget=bool(budget))
        run.on_log = on_log
        return _train(run)


def _check_resumable(file: Path, ckpt: RunCheckpoint, new_budget: bool) -> None:
    """A run continues from its latest checkpoint, and only when there is something to train."""
    if not ckpt.resumable:
        raise ReslabError(f"{file}: holds weights only, not a training run to resume")
    last = file.parent / LAST
    if file.name != LAST and last.exists():
        at = read_run_checkpoint(last).state.iteration
        if at != ckpt.state.iteration:
            raise ReslabError(
                f"{file} is iteration {ckpt.state.iteration} of a run that went on to {at} ({last}); "
                f"resuming from it would rewind the run and replace {LAST}: resume with "
                f"{shlex.quote(str(file.parent))}, or copy {file.name} into a new folder to branch from it"
            )
    if ckpt.budget.done(ckpt.state) and not new_budget:
        raise ReslabError(
            f"{file.parent} has finished ({ckpt.state.iteration} iterations); nothing to resume "
            "(give a longer budget with --iters or --epochs to train on)"
        )


def _check_same_data(cfg: TrainConfig, ckpt: RunCheckpoint, file: Path) -> None:
    """Moved data must be the data the run was trained on."""
    recorded = ckpt.settings.get("data_fingerprint")
    if recorded is None:  # runs of earlier versions recorded no fingerprint: the classes are checked
        return
    if data_fingerprint(cfg.data) != recorded:
        raise ReslabError(
            f"{cfg.data.dir} is not the data {file.parent} was trained on (other class folders or "
            "files); resume with that data"
        )


def _train(run: Run) -> RunResult:
    t0 = time.perf_counter()
    last_row: dict[str, Any] = {}
    last_eval: dict[str, Any] | None = None
    try:
        with Stop() as stop:
            while not run.budget.done(run.state):
                row, ev = _run_epoch(run, stop)
                if row is not None:
                    last_row, last_eval = row, ev or last_eval
    except NonFiniteLoss as e:
        raise NonFiniteLoss(f"{e}; {run.kept()}") from None
    finally:
        if run.log is not None:
            run.log.close()
    if last_eval is None or last_row.get("iteration") != run.state.iteration:  # e.g. a finished run resumed
        last_eval = run.evaluate()
        last_row = {
            **last_row,
            "eval_err": last_eval["err"],
            "eval_loss": last_eval["loss"],
            "eval_top5_err": last_eval["top5_err"],
            "train_err": last_row.get("train_err", math.nan),
        }
    return _finish(run, last_row, last_eval, time.perf_counter() - t0)


def _open(
    cfg: TrainConfig,
    ctx: dist.DistContext,
    policy: TrainPolicy,
    ckpt: RunCheckpoint | None,
    run_dir: Path | None = None,
    new_budget: bool = False,
) -> Run:
    """Everything a run needs, fresh or from the checkpoint of the run it continues (with its own
    budget, or ``new_budget``: the config's, counted from the start of the run)."""
    device = ctx.device if ctx.world > 1 else resolve_device(cfg.device)
    if run_dir is None:
        run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
        if (run_dir / LAST).exists():
            finished = (run_dir / "summary.json").exists()
            raise ReslabError(
                f"{run_dir} already holds a {'finished ' if finished else ''}run; "
                + ("train it on with" if finished else "resume it with")
                + f" --resume {shlex.quote(str(run_dir))}{' --iters N' if finished else ''}, or choose another --out"
            )
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    model_args = dict(cfg.model_args)
    place = Placement(device, cfg.channels_last, cfg.seed, ctx.rank, ctx.world)
    data = build_data(
        cfg.data,
        place=place,
        channels=model_args.pop("in_chans", None),
        progress=cfg.progress and ctx.is_main,
    )
    if ckpt is not None and ckpt.classes and ckpt.classes != data.classes:
        raise ReslabError(
            f"the data's classes ({', '.join(data.classes[:5])}, ...) are not the run's "
            f"({', '.join(ckpt.classes[:5])}, ...); resume with the data it was trained on"
        )
    num_classes = model_args.setdefault("num_classes", len(data.classes))
    if num_classes != len(data.classes):
        raise ReslabError(
            f"model_args.num_classes={num_classes} but the data has {len(data.classes)} classes "
            f"({', '.join(data.classes[:5])}{', ...' if len(data.classes) > 5 else ''})"
        )
    # The decoding path is recorded as chosen, so that a resumed run continues with the same pixels.
    asked = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, decode=data.decode))
    cfg = for_device(asked, device, data.preprocess.size[-1])  # "auto" speed settings resolved
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = policy.build_model(cfg, data, model_args, ckpt is None)
    _check_fits(model, data, cfg)
    model = model.to(device)
    if cfg.sync_bn and ctx.world > 1:
        if device.type != "cuda":
            raise ReslabError(
                "--sync-bn needs GPUs (PyTorch's SyncBatchNorm runs only under CUDA); on CPUs use "
                "a per-process batch of 16 or more"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last if data.ndim == 2 else torch.channels_last_3d)
    torch.manual_seed(cfg.seed + ctx.rank)  # per-rank randomness (dropout, drop-path)

    global_batch = cfg.data.batch_size * ctx.world
    lr_scale = global_batch / 256 if cfg.optim.lr_scaling == "linear" else 1.0
    optimizer = build_optimizer(model, cfg, lr_scale, policy.param_groups(model, cfg))
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    if len(data.train) == 0:
        raise ReslabError(
            f"{data.train.num_samples} training images is less than one batch of {cfg.data.batch_size}; "
            "lower the batch size (--batch-size)"
        )
    budget = Budget(_total_iters(cfg, len(data.train)), global_batch)
    state = TrainState()
    if ckpt is not None:
        state, budget = _restore(ckpt, model, optimizer, scaler, ema, ctx.world, global_batch, device)
        if new_budget:
            budget = dataclasses.replace(budget, total_iters=_total_iters(cfg, len(data.train)))
            if budget.done(state):
                raise ReslabError(
                    f"the run has trained {state.iteration} iterations already; a new budget counts "
                    f"from its start, so give more (it is {budget.total_iters})"
                )
    _start_epoch(policy, state, model, ctx)  # before DDP wraps the model: it registers trainable parameters
    train_model = dist.wrap(model, ctx)
    if cfg.compile == "on":
        train_model = torch.compile(train_model)
    static = isinstance(data.train, TensorLoader)  # every training batch has the same shape
    step = make_step(train_model, optimizer, cfg, device, scaler, ema, static_batches=static, world=ctx.world)
    settings = _settings(cfg, device, ctx, data, step, static)
    cfg = dataclasses.replace(cfg, cuda_graphs=settings["cuda_graphs"], tf32=settings["tf32"])
    run = Run(cfg, asked, run_dir, ctx, device, data, model, step, state, budget, policy, settings)
    if ctx.is_main:
        write_header(run_dir, cfg, settings, policy.record())
        _report_data(data, run_dir)
        run.log = RunLog(run_dir)
        if ckpt is not None:
            run.log.truncate_after(state.iteration)
        _warn_small_batch(model, cfg.data.batch_size)
        print(
            f"reslab: training {cfg.model} on {data.name} ({data.train.num_samples * ctx.world} train / "
            f"{data.eval.num_samples * ctx.world} {data.eval_split} images, {len(data.classes)} classes) for "
            f"{budget.total_iters} iterations ({run.total_epochs} epochs) on {device}"
            + (f" x {ctx.world} processes" if ctx.world > 1 else "")
            + f"; run directory {run_dir}"
        )
        if "img_s" in data.decode_choice:
            rates = ", ".join(f"{k} {v:.0f} img/s" for k, v in data.decode_choice["img_s"].items())
            print(f"reslab: decoding images on the {data.decode} path (measured here: {rates})")
        if device.type == "cuda":
            graphed = "one CUDA graph per step" if settings["cuda_graphs"] == "on" else "eager steps"
            print(
                f"reslab: on {settings['device_name']}: amp {cfg.amp}, TF32 {'on' if cfg.tf32 else 'off'}, "
                f"torch.compile {cfg.compile}, {graphed}"
            )
    return run


def _total_iters(cfg: TrainConfig, steps_per_epoch: int) -> int:
    epochs = cfg.epochs if cfg.epochs is not None else 1.0
    return cfg.iters if cfg.iters is not None else math.ceil(epochs * steps_per_epoch)


def _settings(
    cfg: TrainConfig, device: torch.device, ctx: dist.DistContext, data: Data, step: TrainStep, static: bool
) -> dict[str, Any]:
    """What the run actually uses, with the reasons where "auto" or a refusal decided."""
    captured = isinstance(step, CapturedStep) and step.capture
    blockers = graph_blockers(cfg, device, static_batches=static, world=ctx.world)
    why = "captured" if captured else ("; ".join(blockers) if cfg.cuda_graphs != "off" else "cuda_graphs=off")
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "world": ctx.world,
        "amp": cfg.amp,
        "tf32": cfg.tf32 and cuda,
        "compile": cfg.compile,
        "cuda_graphs": "on" if captured else "off",
        "cuda_graphs_why": why,
        "channels_last": cfg.channels_last,
        "decode": data.decode,
        "decode_choice": data.decode_choice,
        "data_fingerprint": data_fingerprint(cfg.data),
        "torch": str(torch.__version__),
        "code_version": code_version(),
    }


def _check_fits(model: nn.Module, data: Data, cfg: TrainConfig) -> None:
    """Refuse a model that cannot read the data before the first step, naming both."""
    ndim = getattr(getattr(model, "spec", None), "ndim", data.ndim)
    if ndim != data.ndim:
        kind = {2: "images", 3: "video clips"}
        raise ReslabError(
            f"{cfg.model} reads {kind[ndim]} but data {data.name} holds {kind[data.ndim]}; "
            + (
                "train it on clips (reslab train --data clips --data-dir DIR)"
                if ndim == 3
                else "train a 2D model on images (reslab models)"
            )
        )


def _restore(
    ckpt: RunCheckpoint, model, optimizer, scaler, ema, world: int, global_batch: int, device
) -> tuple[TrainState, Budget]:
    """Load a checkpoint's model, optimizer, scaler, EMA, RNG and progress into this run."""
    model.load_state_dict(ckpt.model)
    fresh_lrs = [(g["lr"], g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt.optimizer)
    if ckpt.world != world:  # the learning rate follows this run's global batch
        for g, (lr, initial) in zip(optimizer.param_groups, fresh_lrs, strict=True):
            g["lr"], g["initial_lr"] = lr, initial
    if scaler is not None and ckpt.scaler:
        scaler.load_state_dict(ckpt.scaler)
    if ema is not None and ckpt.ema:
        ema.module.load_state_dict(ckpt.ema)
    state = dataclasses.replace(ckpt.state)
    state.step = state.epoch_samples // global_batch  # this run's batches, when the world size changed
    if ckpt.rng is not None:
        set_rng_state(ckpt.rng, device)
    return state, ckpt.budget


def _run_epoch(run: Run, stop: Stop) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Train (the rest of) one epoch; close it when it ends. Returns its row and evaluation."""
    state = run.state
    _start_epoch(run.policy, state, run.model, run.ctx)
    run.data.train.set_epoch(state.epoch, state.epoch_samples)
    ran_out = train_one_epoch(
        run.step,
        run.data.train,
        state,
        run.cfg,
        budget=run.budget,
        log=run.log_row if run.ctx.is_main else None,
        stop=stop,
        on_step=partial(_periodic_eval, run),
        train_mode=run.policy.train_mode,
    )
    stop.requested = dist.any_flag(stop.requested)
    finished = ran_out or run.budget.done(state)
    row = ev = None
    if finished:
        row, ev = _end_epoch(run)
    if stop.requested:
        run.save(LAST)
        raise TrainingInterrupted(
            f"interrupted at epoch {state.epoch + (0 if finished else 1)}, iteration "
            f"{state.iteration}/{run.budget.total_iters}: saved {run.run_dir / LAST}; resume with: "
            f"reslab train --resume {shlex.quote(str(run.run_dir))}",
            is_main=run.ctx.is_main,
        )
    return row, ev


def _start_epoch(policy: TrainPolicy, state: TrainState, model: nn.Module, ctx: dist.DistContext) -> None:
    message = policy.start_epoch(state.epoch, model)
    if message and ctx.is_main:
        print(f"reslab: epoch {state.epoch + 1}: {message}", flush=True)


def _periodic_eval(run: Run, state: TrainState) -> None:
    every = run.cfg.eval_every_iters
    if (
        every
        and state.iteration % every == 0
        and state.step < run.steps_per_epoch
        and not run.budget.done(state)
    ):
        ev = _finite(run.evaluate(), run, state)
        if run.ctx.is_main:
            run.log_row(
                {
                    "kind": "eval",
                    "iteration": state.iteration,
                    "epoch": state.epoch + 1,
                    "eval_loss": ev["loss"],
                    "eval_err": ev["err"],
                    "eval_top5_err": ev["top5_err"],
                }
            )


def _finite(ev: dict[str, Any], run: Run, state: TrainState) -> dict[str, Any]:
    """An evaluation whose loss is a number; otherwise the run stops before a checkpoint is written
    (a checkpoint is good only if its evaluation is finite)."""
    if not math.isfinite(ev["loss"]):
        raise NonFiniteLoss(
            f"the {run.data.eval_split} loss became {ev['loss']} by iteration {state.iteration}: the "
            "weights no longer give finite outputs. Lower optim.lr, add warm-up (sched.warmup_iters=400) "
            "or clip gradients (grad_clip=1.0)"
        )
    return ev


def _end_epoch(run: Run) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Close an epoch: its summary row, an evaluation when due, best.pt and last.pt."""
    state, sums = run.state, run.state.sums
    row = {
        "kind": "epoch",
        "epoch": state.epoch + 1,
        "iteration": state.iteration,
        "train_loss": sums["loss"] / max(1, sums["n"]),
        "train_err": sums["err"] / max(1, sums["n"]),
        "lr": logged_lr(run.step.optimizer),
        "epoch_time_s": sums["time"],
        "img_s": sums["n"] / max(sums["time"], 1e-9),
        "eval_loss": None,
        "eval_err": None,
        "eval_top5_err": None,
        "ema_eval_err": None,
    }
    state.end_epoch()
    ev = None
    if state.epoch % run.cfg.eval_every == 0 or run.budget.done(state):
        ev = _finite(run.evaluate(), run, state)
        row.update(eval_loss=ev["loss"], eval_err=ev["err"], eval_top5_err=ev["top5_err"])
        if run.step.ema is not None:
            row["ema_eval_err"] = run.evaluate(run.step.ema.module)["err"]
        if ev["err"] < state.best_err:
            state.best_err, state.best_iteration = ev["err"], state.iteration
            run.save(BEST)
    if run.ctx.is_main:
        run.log_row(row)
        print(epoch_line(row, run.total_epochs, run.data.eval_split), flush=True)
    run.save(LAST)
    return row, ev


def _finish(run: Run, last_row: dict[str, Any], last_eval: dict[str, Any], seconds: float) -> RunResult:
    """The final evaluation report, summary.json and the curves."""
    cfg, data, state, main = run.cfg, run.data, run.state, run.ctx.is_main
    report = eval_report(
        last_eval,
        data.classes,
        run.run_dir if main else None,
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
        "train_seconds": state.train_seconds or seconds,
        "device": str(run.device),
        "world": run.ctx.world,
        "decode": data.decode,
        "settings": run.settings,
        "per_class_acc": report["per_class_acc"],
        "confusion_png": report.get("confusion_png"),
    }
    if main:
        if data.train.skipped or data.eval.skipped:
            _list_skipped(data, run.run_dir)
        (run.run_dir / "summary.json").write_text(json_text(summary))
        plot_curves(run.run_dir, title=f"{cfg.model} on {data.name}", split=data.eval_split)
    return RunResult(
        run.run_dir,
        last_row["eval_err"],
        last_row["eval_loss"],
        data.eval_split,
        state.iteration,
        last_row["train_err"],
        seconds,
        state.best_err,
        summary,
        main,
    )


def _list_skipped(data: Data, run_dir: Path) -> None:
    """Name every unreadable image skipped so far in ``skipped.txt`` (decoded sets know them all
    up front; streaming loaders find them as they go, and each was named on stderr then)."""
    skipped = sorted(set(data.skipped + data.train.skipped + data.eval.skipped))
    if skipped:
        listed = run_dir / "skipped.txt"
        listed.write_text("".join(f"{s}\n" for s in skipped))
        print(
            f"reslab: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}; all of them are "
            f"listed in {listed}",
            file=sys.stderr,
        )


def _report_data(data: Data, run_dir: Path) -> None:
    _list_skipped(data, run_dir)
    if data.class_counts and min(data.class_counts) * 1.5 < max(data.class_counts):
        counts = ", ".join(f"{c} {n}" for c, n in zip(data.classes, data.class_counts, strict=True))
        print(
            f"reslab: class imbalance in the training data ({counts}); the error averages over images, "
            "so see the per-class accuracy in eval.json",
            file=sys.stderr,
        )


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
