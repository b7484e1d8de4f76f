"""Stopping a run on a scheduler's signal without losing it, and saying why a run stopped.

Every recipe creates one `Preemption` before its loop. It installs handlers for the signals of
the config's `stop_signals` (default SIGTERM and SIGUSR1: what Slurm, Kubernetes and torchrun send
before they end a job). A handler only notes the signal; at the end of every step the recipe asks
`requested(step)`, which every process answers together (an all-reduce of the noted signal), so all
of them stop after the same step. The recipe then calls `stop(save)`: the step's checkpoint is
written (unless the step just wrote one), the stop is recorded in the run (a `metrics.jsonl`
record, `{"step": N, "stopped": "SIGTERM", "checkpoint": ...}`), the run's lock is released and
`Stopped` is raised, which the CLI prints as one line with exit code 75 (`EXIT_STOPPED`).

A second signal while that checkpoint is being written stops at once: the save removes its
partial files (`ranke.checkpoint.save_checkpoint`), so the previous checkpoint stays intact and
`latest`. Signals before the run begins stopping only confirm the first: a launcher that forwards
a signal its processes also received directly does not cut the save short.

A process that finds another one of the job gone (a collective fails or times out,
`ranke.parallel.collective_failure`) stops with one line from the CLI; `record_lost_process`
records that stop in the run this process was training.
"""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path
from typing import Callable, NoReturn

import torch

from ranke import checkpoint as checkpoint_lib
from ranke.runlock import release
from ranke.runtime import SecondSignal, Stopped, stop_signal_numbers
from ranke.train.logging import MetricsWriter

_running: Preemption | None = None  # the run this process trains, for `record_lost_process`


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class Preemption:
    """The stop signals of one run (see the module docstring).

    `run_dir` holds the run's lock, its checkpoints and the log the stop is recorded in
    (`metrics.jsonl`); `device` is where the all-reduce runs (the recipe's accelerator device).
    Only the main process records."""

    def __init__(self, names: list[str], run_dir: str | Path, device=None, main_process: bool = True):
        global _running
        if _running is not None:  # a run of this process that ended in an error: its handlers go first
            _running.close()
        self.signals = stop_signal_numbers(names)
        self.run_dir, self.device, self.main_process = Path(run_dir), device, main_process
        self.metrics = self.run_dir / "metrics.jsonl"
        self.received: signal.Signals | None = None  # the first signal this process got
        self.agreed: signal.Signals | None = None  # the signal all processes stop on
        self.stopping = False
        self.step = 0  # the last step completed
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # Python runs handlers there only
            self.previous = {number: signal.signal(number, self._handle) for number in self.signals}
        _running = self

    def _handle(self, number: int, frame) -> None:
        if self.stopping:
            self.close()  # from now on a signal has its default effect
            raise SecondSignal(signal.Signals(number).name)
        self.received = self.received or signal.Signals(number)

    def requested(self, step: int) -> bool:
        """Whether any process got a stop signal; at the end of step `step` (1-based), on every
        process (an all-reduce when there are several)."""
        self.step = step
        noted = int(self.received or 0)
        if _distributed():
            flag = torch.tensor([noted], dtype=torch.int64, device=self.device or "cpu")
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            noted = int(flag.item())
        if noted:
            self.agreed, self.stopping = signal.Signals(noted), True
        return self.stopping

    def stop(self, save: Callable[[], object] | None = None, metrics: str | Path | None = None) -> NoReturn:
        """After `requested` said so, on every process: `save` (the checkpoint of this step; None
        when the step wrote one or the recipe keeps none), then record (in `metrics` when the
        recipe logs elsewhere than the run's metrics.jsonl), release, raise `Stopped`."""
        if metrics is not None:
            self.metrics = Path(metrics)
        name = self.agreed.name
        try:
            if save is not None:
                save()
            if _distributed():  # no process exits while the main one is still writing
                torch.distributed.barrier()
        except SecondSignal as second:
            kept = checkpoint_lib.latest_checkpoint(self.run_dir)
            reason = f"{name}, then {second} while saving the checkpoint of step {self.step}: stopped at once"
            self._finish(reason, kept, f"the previous checkpoint is intact: {kept}" if kept else "no checkpoint yet")
        checkpoint = checkpoint_lib.latest_checkpoint(self.run_dir)
        where = f"checkpoint {checkpoint}" if checkpoint else "this recipe keeps no checkpoints"
        self._finish(name, checkpoint, where, f" after step {self.step}")

    def _finish(self, reason: str, checkpoint: Path | None, where: str, when: str = "") -> NoReturn:
        """Record the stop (main process), put the handlers back, release the lock, raise `Stopped`
        with the line `stopped by <reason><when>; <where>; <what to do>`."""
        if self.main_process:
            step = _checkpoint_step(checkpoint) if checkpoint else self.step  # a resume keeps records up to it
            record = {"step": step, "stopped": reason, "checkpoint": _in_run(checkpoint, self.run_dir)}
            MetricsWriter(self.metrics).write(record)
        self.close()
        release(self.run_dir)
        then = "continue with --resume" if checkpoint else "run the command again"
        raise Stopped(f"stopped by {reason}{when}; {where}; {then}")

    def close(self) -> None:
        """Put back the handlers that were there before (a recipe that ends normally calls it)."""
        global _running
        for number, handler in self.previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self.previous = {}
        if _running is self:
            _running = None


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint_lib.STEP_DIR.match(checkpoint.name).group(1))


def _in_run(checkpoint: Path | None, run_dir: Path) -> str | None:
    """The checkpoint as a path inside its run (`checkpoints/step_000002`), so a moved run still reads right."""
    return None if checkpoint is None else str(checkpoint.relative_to(run_dir))


def record_lost_process(error: BaseException) -> str:
    """The one line for a process that lost another process of its job (`error`: the collective
    that failed), recorded in the run this process trains, if any."""
    rank = torch.distributed.get_rank() if _distributed() else 0
    # gloo's first line: "[.../gloo/transport/tcp/pair.cc:537] Read error [...]: Connection reset by peer. This is ..."
    message = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).strip().splitlines() or [type(error).__name__])[0])
    cause = f"a collective failed: {message.split('. ')[0][:200]}"
    line = f"process {rank} lost another process of the job ({cause})"
    run = _running
    if run is None:
        return line + "; relaunch the job"
    run.close()
    checkpoint = checkpoint_lib.latest_checkpoint(run.run_dir)
    record = {
        "step": _checkpoint_step(checkpoint) if checkpoint else 0,
        "stopped": f"process {rank} lost another process during step {run.step + 1} ({cause})",
        "checkpoint": _in_run(checkpoint, run.run_dir),
    }
    try:
        MetricsWriter(run.metrics).write(record)
    except OSError:  # the other process may have died of this very disk (full, gone): the line still says why
        pass
    resume = f"relaunch with --resume (it continues from {checkpoint})" if checkpoint else "relaunch the job"
    return f"{line} during step {run.step + 1}; {resume}"
