"""Post-training runs in worker processes: a study (a sweep, `ranke demo --full`) is a list of
`ranke posttrain --resume` commands, run a few at a time, each with its own thread count, its
output in `RUN.log`. Rerunning a study reuses finished runs and continues unfinished ones (every
run resumes from its latest checkpoint).

While they train, the study prints each running run's latest progress line from its log (step
out of total, seconds per step, ETA, reward: `ranke.runtime.progress_line`) whenever the run
passes another tenth of its steps, and at least every `quiet_seconds` (so a long evaluation does
not look like a hang); a run that fails or is killed stops the study with the last lines of its log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ranke.runtime import EXIT_STOPPED, UserError, progress


@dataclass(frozen=True)
class Job:
    """One `ranke posttrain` run: its directory and its config overrides."""

    run: Path
    overrides: tuple[str, ...]

    def command(self, config: str) -> list[str]:
        return [sys.executable, "-m", "ranke", "posttrain", "--config", config, "--out", str(self.run), "--resume", *self.overrides]


TAIL_LINES = 15  # lines of a failed run's log printed with its error
PROGRESS_LINE = re.compile(r"^\S+: step (\d+)/(\d+), ")  # ranke.runtime.progress_line


def log_tail(log: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last `lines` lines of a run's log (read from its end: logs of long runs grow)."""
    with open(log, "rb") as handle:
        handle.seek(max(0, handle.seek(0, os.SEEK_END) - 16384))
        return handle.read().decode("utf-8", errors="replace").splitlines()[-lines:]


def latest_progress(log: Path) -> tuple[str, float] | None:
    """The run's latest progress line and the fraction of its steps done, or None before its first step."""
    found = [match for line in log_tail(log, lines=200) if (match := PROGRESS_LINE.match(line))]
    if not found:
        return None
    return found[-1].string, int(found[-1].group(1)) / int(found[-1].group(2))


class ProgressShown:
    """When a running run's progress is worth a line: a new tenth of its steps, or `quiet_seconds` of silence."""

    def __init__(self, quiet_seconds: float):
        self.quiet_seconds = quiet_seconds
        self.tenths: dict[Path, int] = {}
        self.shown_at: dict[Path, float] = {}

    def due(self, run: Path, done: float) -> bool:
        now = time.perf_counter()
        tenth = int(done * 10)
        if tenth > self.tenths.get(run, -1) or now - self.shown_at.setdefault(run, now) >= self.quiet_seconds:
            self.tenths[run], self.shown_at[run] = tenth, now
            return True
        return False


def _ended(returncode: int) -> str:
    """How a worker that did not finish ended, for the study's one line."""
    if returncode == EXIT_STOPPED:  # a stop signal: its checkpoint is written, a rerun continues it
        return f"stopped on a signal with its checkpoint (exit {EXIT_STOPPED}); run the same command again to continue"
    return f"failed (killed by signal {-returncode})" if returncode < 0 else f"failed (exit {returncode})"


def run_jobs(jobs: list[Job], config: str, workers: int = 2, threads: int = 1, quiet_seconds: float = 120.0) -> dict[Path, float]:
    """Run `jobs` in `workers` processes at a time with `threads` torch threads each, showing the
    running runs' progress (module docstring); returns each run's wall time in seconds. A run that
    fails or is killed stops the study: its log's last lines, then one line naming the log."""
    if workers < 1 or threads < 1:
        raise UserError(f"workers={workers} and threads={threads} must be >= 1")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "RANKE_NO_PROGRESS": "1"}
    pending, running, seconds = list(jobs), {}, {}
    bar = progress(total=len(jobs), desc="runs")
    shown = ProgressShown(quiet_seconds)
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                job.run.parent.mkdir(parents=True, exist_ok=True)
                log = open(job.run.with_suffix(".log"), "a")
                process = subprocess.Popen(job.command(config), env=env, stdout=log, stderr=subprocess.STDOUT)
                running[process] = (job, log, time.perf_counter())
                bar.write(f"started: {job.run} (log {job.run.with_suffix('.log')})")
            time.sleep(0.5)
            for job, _, _ in running.values():
                latest = latest_progress(job.run.with_suffix(".log"))
                if latest is not None and shown.due(job.run, latest[1]):
                    bar.write(f"  {job.run.name}: {latest[0]}")
            for process in [p for p in running if p.poll() is not None]:
                job, log, started = running.pop(process)
                log.close()
                if process.returncode != 0:
                    log_path = job.run.with_suffix(".log")
                    what = _ended(process.returncode)
                    bar.write(f"{job.run} {what}; the end of {log_path}:")
                    bar.write("\n".join(f"  | {line}" for line in log_tail(log_path)))
                    raise UserError(f"run {job.run} {what}; see {log_path}")
                seconds[job.run] = time.perf_counter() - started
                bar.update(1)
                bar.write(f"done: {job.run} ({seconds[job.run] / 60:.1f} min)")
    finally:
        for process, (_, log, _) in running.items():
            process.terminate()
            process.wait()
            log.close()
        bar.close()
    return seconds
