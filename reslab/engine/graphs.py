"""The training step recorded whole in one CUDA graph: one launch per step instead of hundreds.

The paper's CIFAR networks are small enough that a GPU spends most of a step waiting for Python
to launch kernels. :class:`CapturedStep` runs exactly the arithmetic of the eager step (forward,
loss, backward, clipping, the optimizer update, EMA, the running metric sums) with nothing that
needs the host in between: the learning rate lives in device tensors that the schedule updates
in place, the optimizer update is written with ``torch._foreach`` ops that take those tensors,
and the batch is copied into static input buffers. On CUDA the step is captured once (after a
few warm-up steps on a side stream, as CUDA graphs require) and replayed; anywhere else it runs
uncaptured, which is how the tests compare it with the eager step on a CPU.

The optimizer's state lives in the ``torch.optim`` optimizer as usual (momentum buffers, Adam
moments, step counts), so checkpoints are the same whichever step wrote them: a graphed run
resumes into an eager one and vice versa.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from reslab.config import TrainConfig
from reslab.engine.train import EMA, TrainStep

WARMUP_STEPS = 3  # eager steps on a side stream before capture (lazy initialisations, cuDNN choices)


def graph_blockers(cfg: TrainConfig, device: torch.device, *, static_batches: bool, world: int) -> list[str]:
    """Why this run cannot be captured (empty: it can)."""
    reasons = []
    if device.type != "cuda":
        reasons.append("no CUDA device")
    if not static_batches:
        reasons.append("the streaming loader's batches shrink when unreadable files are skipped")
    if cfg.amp == "fp16":
        reasons.append("fp16's GradScaler checks for overflow on the host every step (use --amp bf16)")
    if world > 1:
        reasons.append("DDP's gradient all-reduce is not captured")
    if cfg.compile == "on":
        reasons.append("torch.compile manages its own graphs")
    return reasons


def make_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    device: torch.device,
    scaler: torch.amp.GradScaler | None,
    ema: EMA | None,
    *,
    static_batches: bool,
    world: int,
) -> TrainStep:
    """The eager step, or the captured one where ``cfg.cuda_graphs`` asks for it and the run allows
    it. ``auto`` captures CUDA runs with static batches and says nothing otherwise; ``on`` says
    once why it cannot (and without CUDA runs the capturable step uncaptured: same arithmetic)."""
    if cfg.cuda_graphs == "off":
        return TrainStep(model, optimizer, cfg, device, scaler, ema)
    reasons = graph_blockers(cfg, device, static_batches=static_batches, world=world)
    if not reasons:
        return CapturedStep(model, optimizer, cfg, device, ema, capture=True)
    if cfg.cuda_graphs == "on":
        if reasons == ["no CUDA device"]:
            warnings.warn(
                "cuda_graphs=on without a CUDA device: the capturable step runs uncaptured (the same "
                "arithmetic, no speed-up)",
                stacklevel=2,
            )
            return CapturedStep(model, optimizer, cfg, device, ema, capture=False)
        warnings.warn(f"cuda_graphs=on: training eagerly, because {'; '.join(reasons)}", stacklevel=2)
    return TrainStep(model, optimizer, cfg, device, scaler, ema)


class CapturedStep(TrainStep):
    """:class:`TrainStep` with a capturable update and metric sums, recorded as one CUDA graph.

    Supports SGD (momentum, Nesterov, weight decay) and AdamW, label smoothing, gradient clipping,
    EMA and bf16 autocast. When the set of trained parameters changes (fine-tuning unfreezes a
    stage) the step is captured anew.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        device: torch.device,
        ema: EMA | None = None,
        *,
        capture: bool = True,
    ) -> None:
        super().__init__(model, optimizer, cfg, device, None, ema)
        if not isinstance(optimizer, torch.optim.SGD | torch.optim.AdamW):
            raise TypeError(f"the captured step updates SGD and AdamW, not {type(optimizer).__name__}")
        self.capture = capture and device.type == "cuda"
        self.lrs = [torch.tensor(g["lr"], dtype=torch.float32, device=device) for g in optimizer.param_groups]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.trained: tuple[bool, ...] = ()  # which parameters the captured graph updates
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.warm = 0  # eager steps taken since the graph was last (re)built

    def set_lr(self, factor: float) -> None:
        super().set_lr(factor)
        for t, g in zip(self.lrs, self.optimizer.param_groups, strict=True):
            t.fill_(g["lr"])

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not self.capture:
            self.optimizer.zero_grad(set_to_none=True)
            self.step(x, y)
            return
        trained = tuple(p.requires_grad for p in self.model.parameters())
        if self.graph is not None and trained == self.trained and x.shape == self.static[0].shape:
            self.static[0].copy_(x, non_blocking=True)
            self.static[1].copy_(y, non_blocking=True)
            self.graph.replay()
            return
        if self.graph is not None:  # other parameters train now (or another batch shape): capture anew
            self.graph, self.warm = None, 0
        if self.warm < WARMUP_STEPS:
            self._eager_on_side_stream(x, y)
            return
        self.static = (x.clone(memory_format=torch.preserve_format), y.clone())
        self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step(*self.static)
        self.trained = trained
        self.graph.replay()  # capture records without running: this batch's step runs now

    def _eager_on_side_stream(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """A real (counted) step, run eagerly on a side stream as CUDA graphs want before capture:
        lazy initialisations and cuDNN's algorithm choices happen here, not inside the graph."""
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self.optimizer.zero_grad(set_to_none=True)
            self.step(x, y)
        main.wait_stream(side)
        self.warm += 1

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One training step on ``x, y`` with no host synchronisation: the part that is captured."""
        logits, loss = self.forward(x, y)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(params, self.cfg.grad_clip, foreach=True)
        self._update()
        self.after_update(logits, loss, y)

    @torch.no_grad()
    def _update(self) -> None:
        opt = self.optimizer
        for group, lr in zip(opt.param_groups, self.lrs, strict=True):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            update = sgd_update if isinstance(opt, torch.optim.SGD) else adamw_update
            update(params, [p.grad for p in params], opt.state, group, lr)


def sgd_update(
    params: list[torch.Tensor], grads: list[torch.Tensor], state: dict, group: dict, lr: torch.Tensor
) -> None:
    """``torch.optim.SGD``'s update (no dampening) with a device-tensor learning rate.

    A missing momentum buffer starts at zero: ``momentum * 0 + g`` is the ``g`` SGD starts with.
    """
    momentum, wd = group["momentum"], group["weight_decay"]
    if wd:
        grads = torch._foreach_add(grads, params, alpha=wd)
    if momentum:
        bufs = [state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
    torch._foreach_sub_(params, torch._foreach_mul(grads, lr))


def adamw_update(
    params: list[torch.Tensor], grads: list[torch.Tensor], state: dict, group: dict, lr: torch.Tensor
) -> None:
    """``torch.optim.AdamW``'s update with a device-tensor learning rate and step counts on the
    device (the form ``torch.optim``'s capturable Adam computes)."""
    beta1, beta2 = group["betas"]
    state = [state[p] for p in params]
    for s, p in zip(state, params, strict=True):
        if "step" not in s:
            s.update(
                step=torch.zeros((), device=p.device),
                exp_avg=torch.zeros_like(p),
                exp_avg_sq=torch.zeros_like(p),
            )
        elif s["step"].device != p.device:  # a checkpoint's counter, loaded on the CPU
            s["step"] = s["step"].to(p.device)
    steps = [s["step"] for s in state]
    exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state]
    torch._foreach_add_(steps, 1)
    if group["weight_decay"]:
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    # -lr / (1 - beta1^t) and sqrt(1 - beta2^t), as tensors
    neg_step_size = torch._foreach_pow(beta1, steps)
    torch._foreach_sub_(neg_step_size, 1)
    torch._foreach_div_(neg_step_size, lr)
    torch._foreach_reciprocal_(neg_step_size)
    bias2 = torch._foreach_pow(beta2, steps)
    torch._foreach_sub_(bias2, 1)
    torch._foreach_neg_(bias2)
    torch._foreach_sqrt_(bias2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias2)
    torch._foreach_add_(denom, group["eps"])
    torch._foreach_div_(denom, neg_step_size)
    torch._foreach_addcdiv_(params, exp_avgs, denom)
