"""Post-training runs in worker processes: a study (a sweep, `ranke demo --full`) is a list of
`ranke posttrain --resume` commands, run a few at a time, each with its own thread count, its
output in `RUN.log`. Rerunning a study reuses finished runs and continues unfinished ones (every
run resumes from its latest checkpoint)."""

from __future__ import annotations

import os
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


def run_jobs(jobs: list[Job], config: str, workers: int = 2, threads: int = 1) -> dict[Path, float]:
    """Run `jobs` in `workers` processes at a time with `threads` torch threads each; returns each
    run's wall time in seconds. A failed run stops the study with one line naming its log."""
    if workers < 1 or threads < 1:
        raise UserError(f"workers={workers} and threads={threads} must be >= 1")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "RANKE_NO_PROGRESS": "1"}
    pending, running, seconds = list(jobs), {}, {}
    bar = progress(total=len(jobs), desc="runs")
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                job.run.parent.mkdir(parents=True, exist_ok=True)
                log = open(job.run.with_suffix(".log"), "a")
                process = subprocess.Popen(job.command(config), env=env, stdout=log, stderr=subprocess.STDOUT)
                running[process] = (job, log, time.perf_counter())
            time.sleep(0.5)
            for process in [p for p in running if p.poll() is not None]:
                job, log, started = running.pop(process)
                log.close()
                if process.returncode != 0:
                    raise UserError(f"run {job.run} failed (exit {process.returncode}); see {job.run.with_suffix('.log')}")
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
