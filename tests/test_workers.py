"""Post-training runs in worker processes (`ranke.workers`): the command each job runs, and one
clear line when a run fails or the pool is mis-sized."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ranke.runtime import UserError
from ranke.workers import Job, run_jobs


def test_a_job_is_a_resumable_posttrain_command(tmp_path):
    job = Job(tmp_path / "run", ("mode=policy", "seed=3"))
    assert job.command("toy") == [
        sys.executable, "-m", "ranke", "posttrain", "--config", "toy", "--out", str(tmp_path / "run"), "--resume",
        "mode=policy", "seed=3",
    ]  # fmt: skip


def test_a_failed_run_stops_the_study_naming_its_log(tmp_path):
    bad = Job(tmp_path / "runs" / "bad", ("no_such_key=1",))
    with pytest.raises(UserError, match=r"run .*bad failed \(exit 2\); see .*bad\.log"):
        run_jobs([bad], "toy", workers=1)
    assert "unknown config key 'no_such_key'" in Path(tmp_path / "runs" / "bad.log").read_text()


@pytest.mark.parametrize("workers, threads", [(0, 1), (1, 0)])
def test_pool_sizes_must_be_positive(workers, threads):
    with pytest.raises(UserError, match="must be >= 1"):
        run_jobs([], "toy", workers=workers, threads=threads)
