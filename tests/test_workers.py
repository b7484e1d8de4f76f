"""Post-training runs in worker processes (`ranke.workers`): the command each job runs, and one
clear line when a run fails or the pool is mis-sized."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ranke.runtime import UserError, progress_line
from ranke.workers import Job, ProgressShown, latest_progress, run_jobs


def test_a_job_is_a_resumable_posttrain_command(tmp_path):
    job = Job(tmp_path / "run", ("mode=policy", "seed=3"))
    assert job.command("toy") == [
        sys.executable, "-m", "ranke", "posttrain", "--config", "toy", "--out", str(tmp_path / "run"), "--resume",
        "mode=policy", "seed=3",
    ]  # fmt: skip


def test_a_failed_run_stops_the_study_naming_its_log_after_its_last_lines(tmp_path, capsys):
    bad = Job(tmp_path / "runs" / "bad", ("no_such_key=1",))
    with pytest.raises(UserError, match=r"run .*bad failed \(exit 2\); see .*bad\.log"):
        run_jobs([bad], "toy", workers=1)
    assert "unknown config key 'no_such_key'" in Path(tmp_path / "runs" / "bad.log").read_text()
    printed = capsys.readouterr().out
    assert re.search(r"bad failed \(exit 2\); the end of .*bad\.log:\n  \| .*unknown config key 'no_such_key'", printed)


def test_a_killed_run_is_named_with_its_signal(tmp_path, capsys):
    slow = Job(tmp_path / "runs" / "slow", ("steps=1000", "eval_samples=0", "grid_every=1000"))
    killer = threading.Timer(8.0, lambda: subprocess.run(["pkill", "-KILL", "-f", str(slow.run)]))
    killer.start()
    try:
        with pytest.raises(UserError, match=r"run .*slow failed \(killed by signal 9\)"):
            run_jobs([slow], "toy", workers=1)
    finally:
        killer.cancel()
    assert "slow failed (killed by signal 9); the end of" in capsys.readouterr().out


def test_the_study_shows_each_runs_progress_every_tenth_of_its_steps(tmp_path, capsys):
    tiny = ("prompts_per_step=2", "group_size=2", "eval_samples=0", "grid_every=100", "mode=policy", "precision=fp32")
    run_jobs([Job(tmp_path / "a", (*tiny, "steps=4"))], "toy", workers=1)
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  a: ")]
    assert shown and shown[-1].startswith("  a: posttrain[policy]: step 4/4, ")
    assert all(re.fullmatch(r"  a: posttrain\[policy\]: step \d/4, \d+\.\d\d s/step, ETA .*, toy_clip \d+\.\d\d, kl .*", line) for line in shown)


def test_latest_progress_reads_the_last_progress_line_and_the_fraction_done(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("posttrain: precision fp32 (fp32 as requested)\n")
    assert latest_progress(log) is None
    log.write_text(log.read_text() + progress_line("posttrain[both]", 3, 12, 2.0, {"toy_clip": "90.10"}) + "\nsome warning\n")
    assert latest_progress(log) == ("posttrain[both]: step 3/12, 2.00 s/step, ETA 18 s, toy_clip 90.10", 0.25)


def test_progress_shown_on_each_new_tenth_or_after_a_quiet_spell(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 3.0, 200.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    shown = ProgressShown(quiet_seconds=120)
    assert [shown.due(Path("r"), done) for done in (0.05, 0.08, 0.1, 0.15, 0.15)] == [True, False, True, False, True]


@pytest.mark.parametrize("workers, threads", [(0, 1), (1, 0)])
def test_pool_sizes_must_be_positive(workers, threads):
    with pytest.raises(UserError, match="must be >= 1"):
        run_jobs([], "toy", workers=workers, threads=threads)


def test_a_run_stopped_by_a_signal_is_named_as_stopped_and_resumable(tmp_path, capsys):
    slow = Job(tmp_path / "runs" / "slow", ("steps=1000", "eval_samples=0", "grid_every=1000", "precision=fp32"))

    def stop_when_training():  # after its first progress line, so the stop finds a step to finish
        while not (slow.run.with_suffix(".log").is_file() and latest_progress(slow.run.with_suffix(".log"))):
            time.sleep(0.2)
        subprocess.run(["pkill", "-TERM", "-f", str(slow.run)])

    stopper = threading.Thread(target=stop_when_training, daemon=True)
    stopper.start()
    with pytest.raises(UserError, match=r"run .*slow stopped on a signal with its checkpoint \(exit 75\); run the same command again"):
        run_jobs([slow], "toy", workers=1)
    assert "ranke: stopped by SIGTERM after step" in capsys.readouterr().out  # the log's tail
