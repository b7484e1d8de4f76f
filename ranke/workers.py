"""Post-training runs in worker processes: a study (a sweep, `ranke demo --full`) is a list of
`ranke posttrain --resume` commands, run a few at a time, each with its own thread count, its
output in `RUN.log`. Rerunning a study reuses finished runs and continues unfinished ones (every
run resumes from its latest checkpoint).

While they train, every `status_seconds` the study prints each running run's latest progress
line from its log (step out of total, seconds per step, ETA, reward: `ranke.runtime.progress_line`);
a run that fails or is killed stops the study with the last lines of its log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ranke.runtime import UserError, progress


@dataclass(frozen=True)
class Job:
    """One `ranke posttrain` run: its directory and its config overrides."""

    run: Path
    overrides: tuple[str, ...]

    def command(self, config: str) -> list[str]:
        return [sys.executable, "-m", "ranke", "posttrain", "--config", config, "--out", str(self.run), "--resume", *self.overrides]


TAIL_LINES = 15  # lines of a failed run's log printed with its error
PROGRESS_LINE = re.compile(r"^\S+: step \d+/\d+, ")  # ranke.runtime.progress_line


def log_tail(log: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last `lines` lines of a run's log (read from its end: logs of long runs grow)."""
    with open(log, "rb") as handle:
        handle.seek(max(0, handle.seek(0, os.SEEK_END) - 16384))
        return handle.read().decode("utf-8", errors="replace").splitlines()[-lines:]


def latest_progress(log: Path) -> str | None:
    """The run's latest progress line, or None before its first step."""
    found = [line for line in log_tail(log, lines=200) if PROGRESS_LINE.match(line)]
    return found[-1] if found else None


def run_jobs(jobs: list[Job], config: str, workers: int = 2, threads: int = 1, status_seconds: float = 30.0) -> dict[Path, float]:
    """Run `jobs` in `workers` processes at a time with `threads` torch threads each, printing the
    running runs' progress every `status_seconds`; returns each run's wall time in seconds. A run
    that fails or is killed stops the study: its log's last lines, then one line naming the log."""
    if workers < 1 or threads < 1:
        raise UserError(f"workers={workers} and threads={threads} must be >= 1")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "RANKE_NO_PROGRESS": "1"}
    pending, running, seconds = list(jobs), {}, {}
    bar = progress(total=len(jobs), desc="runs")
    last_status = time.perf_counter()
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
            if time.perf_counter() - last_status >= status_seconds:
                last_status = time.perf_counter()
                for job, _, _ in running.values():
                    bar.write(f"  {job.run.name}: {latest_progress(job.run.with_suffix('.log')) or 'starting'}")
            for process in [p for p in running if p.poll() is not None]:
                job, log, started = running.pop(process)
                log.close()
                if process.returncode != 0:
                    log_path = job.run.with_suffix(".log")
                    how = f"killed by signal {-process.returncode}" if process.returncode < 0 else f"exit {process.returncode}"
                    bar.write(f"{job.run} failed ({how}); the end of {log_path}:")
                    bar.write("\n".join(f"  | {line}" for line in log_tail(log_path)))
                    raise UserError(f"run {job.run} failed ({how}); see {log_path}")
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
