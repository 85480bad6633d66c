"""Training many runs for a study: one after another in this process, or several at once in
processes of their own, packed onto the device, each a normal run directory that a restarted
study resumes.

Each run is a typed :class:`~reslab.config.TrainConfig` handed to :func:`reslab.engine.fit`
(in a child process with ``jobs`` > 1: its console output goes to the run's ``train.log``, its
metric rows come back over a pipe). The parent blocks on the children's pipes and exit sentinels
(``multiprocessing.connection.wait``): no polling. The longest runs start first, so the last ones
to finish are short. ``jobs="auto"`` on a GPU finds how many runs fill it by measurement
(:class:`Concurrency`): it adds a run while the work done per second keeps rising.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from reslab.complexity import model_stats
from reslab.config import POSITIVE, TrainConfig, arg_type
from reslab.engine import fit
from reslab.engine.checkpoint import LAST
from reslab.errors import ReslabError

MAX_JOBS = 8  # runs packed onto one GPU at most (each holds a CUDA context)
GAIN = 1.1  # another run is worth it while it adds at least 10% more work per second
WINDOW_S = 20.0  # seconds of progress that measure a degree of concurrency (after a run starts)


@dataclass(frozen=True)
class PlannedRun:
    """One run of a study: its label and its config (``cfg.out`` is its run directory)."""

    label: str
    cfg: TrainConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def finished(self) -> bool:
        return (self.run_dir / "summary.json").exists()

    @property
    def work(self) -> float:
        """Multiply-adds per training iteration (the forward pass's, which sets the backward's)."""
        return model_stats(self.cfg.model)["gmacs"] * self.cfg.data.batch_size

    @property
    def cost(self) -> float:
        """How long the run takes, in units comparable between runs: work times iterations."""
        return self.work * (self.cfg.iters or 1000 * (self.cfg.epochs or 1))


def _fit(run: PlannedRun, progress: bool, on_log=None) -> None:
    """Train ``run``, or continue it where an earlier study stopped it."""
    if (run.run_dir / LAST).exists():
        fit(resume=run.run_dir, device=run.cfg.device, progress=progress, on_log=on_log)
    else:
        fit(run.cfg, progress=progress, on_log=on_log)


def _child(run: PlannedRun, conn: Connection, threads: int) -> None:
    """A child process: console output into the run's train.log, progress over ``conn``, the CPU
    threads of its share (on CPUs the thread count changes float order: a run trained at once
    with others then computes what it computes alone with as many threads)."""
    torch.set_num_threads(threads)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run.run_dir / "train.log", "a", buffering=1)  # noqa: SIM115 (until the process ends)
    os.dup2(log.fileno(), sys.stdout.fileno())
    os.dup2(log.fileno(), sys.stderr.fileno())
    try:
        _fit(run, progress=False, on_log=lambda row: conn.send(row["iteration"]))
    except BaseException as e:
        print(f"reslab: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


@dataclass
class Concurrency:
    """How many runs share the device: measured. Start with one; once the newest run has trained
    for :data:`WINDOW_S` seconds, compare the work done per second with the rate before it started;
    add another run while that rose by at least :data:`GAIN`, otherwise hold. ``fixed`` skips the
    measurement."""

    cap: int
    fixed: int | None = None
    rates: dict[int, float] = field(default_factory=dict)  # work per second measured with k runs
    settled: bool = False

    @property
    def start(self) -> int:
        return self.fixed or 1

    def observe(self, running: int, rate: float) -> bool:
        """A rate measured with ``running`` runs; True when one more should start."""
        if self.fixed or self.settled:
            return False
        self.rates[running] = rate
        previous = self.rates.get(running - 1)
        if running >= self.cap or (previous is not None and rate < GAIN * previous):
            self.settled = True
            return False
        return True


def longest_first(runs) -> list[PlannedRun]:
    """The order runs start in: the most work first, so that the last to finish are short ones."""
    return sorted(runs, key=lambda r: -r.cost)


def _auto_jobs(runs: list[PlannedRun]) -> Concurrency:
    """``jobs="auto"``: measured on CUDA; one at a time on CPUs (the runs would share its cores)."""
    cuda = any(r.cfg.device != "cpu" for r in runs) and torch.cuda.is_available()
    return Concurrency(min(MAX_JOBS, len(runs)), fixed=None if cuda else 1)


def train_runs(runs: list[PlannedRun], jobs: int | str = 1, progress: bool = True) -> dict[str, Any]:
    """Train every run that has not finished, the longest first: in this process one after another
    (``jobs`` 1), ``jobs`` at a time in child processes, or ``"auto"`` (measured on a GPU). Returns
    the wall time and the concurrency used."""
    t0 = time.perf_counter()
    todo = longest_first(r for r in runs if not r.finished)
    reused = [r.label for r in runs if r.finished]
    resumed = [r.label for r in todo if (r.run_dir / LAST).exists()]
    if reused:
        print(
            f"reslab: reusing {len(reused)} finished run(s) of this study: {', '.join(reused)}",
            file=sys.stderr,
        )
    if resumed:
        print(f"reslab: resuming {', '.join(resumed)} where they stopped", file=sys.stderr)
    concurrency = _auto_jobs(todo) if jobs == "auto" else Concurrency(len(todo), fixed=int(jobs))
    if concurrency.fixed == 1 or not todo:
        for run in todo:
            _fit(run, progress)
        return {"wall_s": time.perf_counter() - t0, "jobs": 1, "rates": {}}
    width = _in_processes(todo, concurrency, progress)
    return {"wall_s": time.perf_counter() - t0, "jobs": width, "rates": concurrency.rates}


def _in_processes(todo: list[PlannedRun], concurrency: Concurrency, progress: bool) -> int:
    """Train ``todo`` in child processes, as many at once as ``concurrency`` says; returns the most."""
    total = sum(r.cfg.iters or 0 for r in todo)
    bar = tqdm(total=total, unit="it", desc=f"{len(todo)} runs", disable=not progress or not total)
    context = mp.get_context("spawn")  # a fresh interpreter per run: no CUDA state or threads inherited
    pending, running, failed = list(todo), {}, []
    done: dict[str, int] = {}  # iterations per run
    work = 0.0  # multiply-adds trained so far, all runs
    width = concurrency.start
    newest: str | None = None  # the run whose first progress starts the next measurement
    window: tuple[float, float] | None = None  # (time, work) when that measurement started
    threads = max(1, torch.get_num_threads() // (concurrency.fixed or 1))
    while pending or running:
        while pending and len(running) < width:
            run = pending.pop(0)
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(run, send, threads), name=f"reslab-{run.label}")
            process.start()
            send.close()
            running[process.sentinel] = (process, receive, run)
            newest, window = run.label, None
        conns = {entry[1]: entry for entry in running.values() if entry[1] is not None}
        for ready in wait([*running, *conns]):
            if ready in conns:
                process, receive, run = conns[ready]
                try:
                    iteration = receive.recv()
                except EOFError:  # the child is ending; its sentinel says how
                    running[process.sentinel] = (process, None, run)
                    receive.close()
                    continue
                work += (iteration - done.get(run.label, 0)) * run.work
                done[run.label] = iteration
                bar.n = sum(done.values())
                bar.refresh()
                now = time.perf_counter()
                if run.label == newest and window is None:  # it trains: measure from here
                    window = (now, work)
                elif window is not None and now - window[0] >= WINDOW_S:
                    rate = (work - window[1]) / (now - window[0])
                    newest, window = None, None
                    if concurrency.observe(len(running), rate) and pending:
                        width += 1
            elif ready in running:
                process, receive, run = running.pop(ready)
                process.join()
                if receive is not None:
                    receive.close()
                if process.exitcode != 0:
                    failed.append(f"{run.label} (exit {process.exitcode}; see {run.run_dir / 'train.log'})")
    bar.close()
    if failed:
        raise ReslabError(f"{len(failed)} run(s) failed: {'; '.join(failed)}; rerun the study to resume them")
    return width


def jobs_arg(text: str) -> int | str:
    """``--jobs``: a number of runs at once, or ``auto``."""
    if text == "auto":
        return text
    return arg_type(int, POSITIVE)(text)


jobs_arg.constraint = POSITIVE
