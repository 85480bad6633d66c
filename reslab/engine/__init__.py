"""The training engine: small modules with one job each, wired by :func:`fit`.

``train`` (the step and the epoch), ``evaluate`` (metrics), ``checkpoint`` (the format, resume
state and the one reader), ``rundir`` (run directory, logs, plots), ``device`` (devices, AMP,
RNG), ``schedule`` (learning rates), ``distributed`` (DDP) and ``fit`` (the run).
"""

from reslab.engine.checkpoint import Budget, Checkpoint, TrainState, read_checkpoint
from reslab.engine.device import resolve_device
from reslab.engine.evaluate import EvalStats, eval_report, evaluate
from reslab.engine.fit import RunResult, TrainPolicy, fit
from reslab.engine.train import EMA, TrainStep, build_optimizer, train_one_epoch

__all__ = [
    "EMA",
    "Budget",
    "Checkpoint",
    "EvalStats",
    "RunResult",
    "TrainPolicy",
    "TrainState",
    "TrainStep",
    "build_optimizer",
    "eval_report",
    "evaluate",
    "fit",
    "read_checkpoint",
    "resolve_device",
    "train_one_epoch",
]
