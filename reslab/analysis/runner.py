"""Training many runs for a study: one after another in this process, or several at once in
processes of their own, each a normal run directory that a restarted study resumes.

Each run is a typed :class:`~reslab.config.TrainConfig` handed to :func:`reslab.engine.fit`
(in a child process with ``jobs`` > 1: its console output goes to the run's ``train.log``, its
metric rows come back over a pipe for the progress bar). The parent blocks on the children's
pipes and exit sentinels (``multiprocessing.connection.wait``): no polling.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

from tqdm import tqdm

from reslab.config import TrainConfig
from reslab.engine import fit
from reslab.engine.checkpoint import LAST
from reslab.errors import ReslabError


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


def _fit(run: PlannedRun, progress: bool, on_log=None) -> None:
    """Train ``run``, or continue it where an earlier study stopped it."""
    if (run.run_dir / LAST).exists():
        fit(resume=run.run_dir, device=run.cfg.device, progress=progress, on_log=on_log)
    else:
        fit(run.cfg, progress=progress, on_log=on_log)


def _child(run: PlannedRun, conn: Connection) -> None:
    """A child process: console output into the run's train.log, progress rows over ``conn``."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run.run_dir / "train.log", "a", buffering=1)  # noqa: SIM115 (until the process ends)
    os.dup2(log.fileno(), sys.stdout.fileno())
    os.dup2(log.fileno(), sys.stderr.fileno())
    try:
        _fit(run, progress=False, on_log=lambda row: conn.send(row["iteration"]))
    except BaseException as e:
        print(f"reslab: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def train_runs(runs: list[PlannedRun], jobs: int = 1, progress: bool = True) -> None:
    """Train every run that has not finished: in this process one after another (``jobs`` 1), or
    ``jobs`` at a time in child processes, started in the order given."""
    todo = [r for r in runs if not r.finished]
    reused = [r.label for r in runs if r.finished]
    resumed = [r.label for r in todo if (r.run_dir / LAST).exists()]
    if reused:
        print(
            f"reslab: reusing {len(reused)} finished run(s) of this study: {', '.join(reused)}",
            file=sys.stderr,
        )
    if resumed:
        print(f"reslab: resuming {', '.join(resumed)} where they stopped", file=sys.stderr)
    if jobs == 1:
        for run in todo:
            _fit(run, progress)
        return
    total = sum(r.cfg.iters or 0 for r in todo)
    bar = tqdm(
        total=total, unit="it", desc=f"{len(todo)} runs, {jobs} at a time", disable=not progress or not total
    )
    context = mp.get_context("spawn")  # a fresh interpreter per run: no CUDA state or threads inherited
    pending, running, failed = list(todo), {}, []
    done_iters: dict[str, int] = {}
    while pending or running:
        while pending and len(running) < jobs:
            run = pending.pop(0)
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(run, send), name=f"reslab-{run.label}")
            process.start()
            send.close()
            running[process.sentinel] = (process, receive, run)
        conns = {entry[1]: entry for entry in running.values() if entry[1] is not None}
        for ready in wait([*running, *conns]):
            if ready in conns:
                process, receive, run = conns[ready]
                try:
                    done_iters[run.label] = receive.recv()
                except EOFError:  # the child is ending; its sentinel says how
                    running[process.sentinel] = (process, None, run)
                    receive.close()
                    continue
                bar.n = sum(done_iters.values())
                bar.refresh()
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
