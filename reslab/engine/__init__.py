"""The training engine: small named functions (train_one_epoch, evaluate, fit)."""

from reslab.engine.loop import EMA, RunResult, TrainState, evaluate, fit, train_one_epoch

__all__ = ["EMA", "RunResult", "TrainState", "evaluate", "fit", "train_one_epoch"]
