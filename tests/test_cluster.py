"""Faults of a job on a cluster (ARCHITECTURE.md "Faults", docs/distributed.md "What happens on a
fault?"): a stop signal anywhere in a step checkpoints that step, records the stop, exits 75 and
resumes bit-identically; a second signal during that save stops at once and keeps the previous
checkpoint; a full disk (an injected ENOSPC, and a real size-limited tmpfs) keeps the previous
checkpoint and `latest`, removes the partial files and stops with one line; with two processes a
signal to one of them stops both after the same step, and a killed process stops the other one
within seconds with one line, the run resuming exactly from its last checkpoint.

The signals are real (`os.kill` of this process, or of a rank's process); the injections wrap the
real functions and act at chosen calls."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_posttrain import TINY
from test_recipes import TINY_TOKENIZER as TINY_TOKENIZER_BASE

from ranke import checkpoint as checkpoint_lib
from ranke.backbones.base import Backbone
from ranke.cli import main
from ranke.images import save_image_grid
from ranke.runlock import LOCK_FILE
from ranke.runtime import EXIT_LOST_PROCESS, EXIT_STOPPED, Stopped, UserError
from ranke.train import judges, posttrain
from ranke.train.logging import RunLogger
from ranke.train.posttrain import train_posttrain
from ranke.train.sft import train_sft
from ranke.train.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [*TINY, "mode=both", "steps=3", "disc_start=0", "grid_every=100", "policy_ema_every=1"]
STEMS = ("policy", "policy_ema", "vq", "vq_ema", "discriminator")
ENV = {**os.environ, "RANKE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """Exit code and stderr lines of `ranke *argv`, run in this process."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err.strip().splitlines()


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def training_records(run: Path) -> list[dict]:
    """The step records without their timings and without stop records."""
    return [
        {key: value for key, value in record.items() if not key.startswith("time/")}
        for record in records(run)
        if "stopped" not in record
    ]


def checkpoint_entries(run: Path) -> list[str]:
    """Everything in RUN/checkpoints: complete step directories, `latest`, and any temporary leftovers."""
    return sorted(entry.name for entry in (run / "checkpoints").iterdir())


def assert_same_final_weights(a: Path, b: Path, step: int) -> None:
    for stem in STEMS:
        name = f"checkpoints/step_{step:06d}/{stem}.safetensors"
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{stem} differs"


def signal_on_calls(function, calls: set[int]):
    """`function`, sending SIGTERM to this process as it starts the given 1-based calls."""
    count = 0

    def wrapped(*args, **kwargs):
        nonlocal count
        count += 1
        if count in calls:
            # a default handler here would end the test session: the run must have installed its own
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
            os.kill(os.getpid(), signal.SIGTERM)
        return function(*args, **kwargs)

    return wrapped


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, one_thread) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    train_posttrain("toy", str(run), SETTINGS)
    return run


# point of step 2 -> (object, attribute whose call carries the signal, which call, when checkpoints are due)
POINTS = {
    "rollout": (Backbone, "sample", 2, "save_every=100"),  # step 1 and 2's rollouts; the grid samples at step 3 only
    "update": (posttrain, "policy_loss", 2, "save_every=100"),  # one GRPO pass per step
    "checkpoint_write": (checkpoint_lib, "save_file", 1, "save_every=2"),  # the first file of step 2's checkpoint
}


@pytest.mark.parametrize("point", POINTS)
def test_a_stop_signal_checkpoints_the_step_exits_75_and_resumes_bit_identically(
    straight_run, tmp_path, monkeypatch, capsys, one_thread, point
):
    owner, name, call, save_every = POINTS[point]
    monkeypatch.setattr(owner, name, signal_on_calls(getattr(owner, name), {call}))
    run = tmp_path / "run"
    code, err = cli(capsys, "posttrain", "--out", str(run), *SETTINGS, save_every)
    assert code == EXIT_STOPPED == 75
    assert err == [f"ranke: stopped by SIGTERM after step 2; checkpoint {run}/checkpoints/step_000002; continue with --resume"]
    assert checkpoint_entries(run) == ["latest", "step_000002"]  # the stop's checkpoint, or the step's own
    assert checkpoint_lib.checkpoint_damage(run / "checkpoints" / "step_000002") is None
    assert records(run)[-1] == {"step": 2, "stopped": "SIGTERM", "checkpoint": "checkpoints/step_000002"}
    assert (run / LOCK_FILE).read_text() == ""  # released cleanly
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handler is gone with it

    monkeypatch.undo()
    train_posttrain("toy", str(run), [*SETTINGS, save_every], resume=True)
    assert_same_final_weights(straight_run, run, 3)
    assert training_records(run) == training_records(straight_run)


TINY_SFT = ["device=cpu", "sft.batch_size=4", "sft.steps=3", "sft.grid_every=100", "sft.eval_samples=2",
            "sft.eval_prompts=2", "sft.warmup_steps=1", "sft.save_every=100", "log_with=none"]  # fmt: skip
TINY_TOKENIZER = [*TINY_TOKENIZER_BASE, "tokenizer.steps=3", "tokenizer.save_every=100", "log_with=none"]


@pytest.mark.parametrize("recipe", ["tokenizer", "sft"])
def test_the_tokenizer_and_sft_recipes_stop_the_same_way(tmp_path, monkeypatch, one_thread, recipe):
    """The shared helper in the other recipes with checkpoints: a signal in step 2 (as it draws its
    batch) checkpoints step 2, and the resumed run ends with the weights of a straight one."""
    train, settings, stem = {
        "tokenizer": (train_tokenizer, TINY_TOKENIZER, "vq"), "sft": (train_sft, TINY_SFT, "policy")
    }[recipe]  # fmt: skip
    train("toy", str(tmp_path / "straight"), settings)
    module = sys.modules[train.__module__]
    monkeypatch.setattr(module, "train_batch", signal_on_calls(module.train_batch, {2}))
    run = tmp_path / "run"
    with pytest.raises(Stopped, match=f"after step 2; checkpoint {run}/checkpoints/step_000002; continue with --resume"):
        train("toy", str(run), settings)
    assert checkpoint_entries(run) == ["latest", "step_000002"]
    assert records(run)[-1] == {"step": 2, "stopped": "SIGTERM", "checkpoint": "checkpoints/step_000002"}
    monkeypatch.undo()
    train("toy", str(run), settings, resume=True)
    name = f"checkpoints/step_000003/{stem}.safetensors"
    assert (run / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


def test_the_judges_recipe_stops_after_the_step_and_says_it_keeps_no_checkpoints(tmp_path, monkeypatch, capsys, one_thread):
    sizes = "steps=3 batch_size=8 warmup_steps=1 eval_scenes=20 fd_images=20 model.width=8 model.feature_dim=16"
    monkeypatch.setattr(judges, "train_batch", signal_on_calls(judges.train_batch, {2}))
    run = tmp_path / "run"
    code, err = cli(capsys, "train-reward", "--out", str(run), "reward.models=[features]", "log_with=none",
                    *(f"reward.features.{item}" for item in sizes.split()))  # fmt: skip
    assert code == EXIT_STOPPED
    assert err == ["ranke: stopped by SIGTERM after step 2; this recipe keeps no checkpoints; run the command again"]
    assert records(run / "features")[-1] == {"step": 2, "stopped": "SIGTERM", "checkpoint": None}
    assert not (run / "toy_features.safetensors").exists() and not (run / "summary.json").exists()
    assert (run / LOCK_FILE).read_text() == ""


def test_a_second_signal_during_the_save_stops_at_once_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, one_thread
):
    """A signal in step 3's rollout, a second one while step 3's checkpoint is being written (its
    second file; step 2's checkpoint was calls 1-5): the save stops, its partial directory goes,
    step 2 stays intact and `latest`."""
    monkeypatch.setattr(Backbone, "sample", signal_on_calls(Backbone.sample, {3}))
    monkeypatch.setattr(checkpoint_lib, "save_file", signal_on_calls(checkpoint_lib.save_file, {7}))
    run = tmp_path / "run"
    with pytest.raises(Stopped) as stopped:
        train_posttrain("toy", str(run), [*SETTINGS, "steps=4", "save_every=2"])
    assert str(stopped.value) == (
        f"stopped by SIGTERM, then SIGTERM while saving the checkpoint of step 3: stopped at once; "
        f"the previous checkpoint is intact: {run}/checkpoints/step_000002; continue with --resume"
    )
    assert checkpoint_entries(run) == ["latest", "step_000002"]  # no step_000003, no .step_000003.tmp
    assert checkpoint_lib.latest_checkpoint(run).name == "step_000002"
    assert checkpoint_lib.checkpoint_damage(run / "checkpoints" / "step_000002") is None
    assert records(run)[-1]["stopped"].startswith("SIGTERM, then SIGTERM while saving") and records(run)[-1]["step"] == 2
    assert (run / LOCK_FILE).read_text() == ""
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_signal_as_the_run_begins_to_stop_ends_it_with_one_line(tmp_path, monkeypatch, capsys, one_thread):
    """Between the step's end and its save the run closes its log; a second signal there stops the
    command at once too (exit 75), and step 2's own checkpoint is intact."""
    monkeypatch.setattr(Backbone, "sample", signal_on_calls(Backbone.sample, {2}))
    monkeypatch.setattr(RunLogger, "close", signal_on_calls(RunLogger.close, {1}))
    run = tmp_path / "run"
    code, err = cli(capsys, "posttrain", "--out", str(run), *SETTINGS, "save_every=1")
    assert code == EXIT_STOPPED
    assert err == ["ranke: stopped at once by a second SIGTERM; continue with --resume from the newest checkpoint"]
    assert checkpoint_entries(run) == ["latest", "step_000001", "step_000002"]
    assert checkpoint_lib.checkpoint_damage(run / "checkpoints" / "step_000002") is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a third signal would end the process


def enospc_on_call(function, call: int):
    """`function` (a writer `(data, path)`), which on the given call writes part of a file and
    then fails as a full disk does."""
    count = 0

    def wrapped(data, path, *args, **kwargs):
        nonlocal count
        count += 1
        if count == call:
            Path(path).write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return function(data, path, *args, **kwargs)

    return wrapped


def assert_previous_checkpoint_kept(run: Path) -> None:
    assert checkpoint_entries(run) == ["latest", "step_000001"]  # the partial step_000002 is gone
    assert checkpoint_lib.latest_checkpoint(run).name == "step_000001"
    assert checkpoint_lib.checkpoint_damage(run / "checkpoints" / "step_000001") is None


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_stops_with_one_line(
    tmp_path, monkeypatch, capsys, one_thread
):
    """Injected: the third file of step 2's checkpoint fails half-written with ENOSPC."""
    monkeypatch.setattr(checkpoint_lib, "save_file", enospc_on_call(checkpoint_lib.save_file, 5 + 3))
    run = tmp_path / "run"
    code, err = cli(capsys, "posttrain", "--out", str(run), *SETTINGS, "save_every=1")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"ranke: error: no space left on the device for '{run}/checkpoints/step_000002': it needs about ")
    assert "MiB are free; the previous checkpoint step_000001 is intact and latest; free some space" in err[0]
    assert_previous_checkpoint_kept(run)


def test_a_full_disk_during_a_sample_grid_removes_the_partial_file(tmp_path, monkeypatch):
    real_write = Path.write_bytes

    def half_then_full(path: Path, data: bytes) -> int:
        real_write(path, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(UserError, match=r"no space left on the device for '.*grid\.png': it needs about [\d.]+ KiB"):
        save_image_grid(torch.rand(2, 3, 8, 8), tmp_path / "grid.png")
    assert not (tmp_path / "grid.png").exists()


def tmpfs_usable() -> bool:
    """Whether this process may mount a tmpfs in a mount namespace of its own (root, unshare)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not tmpfs_usable(), reason="needs root and unshare to mount a size-limited tmpfs")
def test_a_real_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """A 75 MiB tmpfs, mounted in a mount namespace of the run's own (so nothing leaks to this
    machine's mounts): a mode=policy checkpoint takes 51 MiB, so the second one fills the disk.
    The run directory is copied out before the namespace goes."""
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    settings = [*TINY, "mode=policy", "steps=3", "save_every=1", "grid_every=100", "log_with=none"]
    command = " ".join([sys.executable, "-m", "ranke", "posttrain", "--out", str(disk / "run"), *settings])
    script = f'mount -t tmpfs -o size=75m tmpfs "{disk}" && {command}; code=$?; cp -a "{disk}/run" "{copy}"; exit $code'
    result = subprocess.run(["unshare", "--mount", "sh", "-c", script], env=ENV, cwd=ROOT, capture_output=True, text=True)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1, result.stderr[-3000:]
    assert err[0].startswith(f"ranke: error: no space left on the device for '{disk}/run/checkpoints/step_000002'")
    assert_previous_checkpoint_kept(copy)


# --- two processes ------------------------------------------------------------------------------

TWO = ["mode=policy", "prompts_per_step=4", "group_size=2", "grid_prompts=2", "eval_samples=0", "policy_lr=1e-5",
       "seed=3", "grid_every=100", "deterministic=true", "log_with=none", "steps=5", "save_every=100"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(out: Path, *overrides: str, resume: bool = False) -> list[subprocess.Popen]:
    """Two processes of one job, started as a launcher starts them (RANK, WORLD_SIZE, MASTER_*), but
    with no launcher to end the survivors: each process must stop by itself."""
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    command = [sys.executable, "-m", "ranke", "posttrain", "--out", str(out), *TWO, *overrides,
               *(["--resume"] if resume else [])]  # fmt: skip
    return [
        subprocess.Popen(command, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]  # fmt: skip


def wait_for_step(run: Path, step: int, processes: list[subprocess.Popen], timeout: float = 240) -> None:
    """Until the job has logged step `step` (the main process writes each step's record after the step)."""
    deadline = time.monotonic() + timeout
    log = run / "metrics.jsonl"
    while not (log.is_file() and f'{{"step": {step}, "reward"' in log.read_text()):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), f"no step {step} in {log}"
        time.sleep(0.02)


def outcome(processes: list[subprocess.Popen], timeout: float = 240) -> tuple[list[int], list[list[str]]]:
    errors = [process.communicate(timeout=timeout)[1] for process in processes]
    return [process.returncode for process in processes], [error.strip().splitlines() for error in errors]


@pytest.mark.parametrize("outcome_code", [0, 2])
def test_a_process_of_a_multi_process_job_exits_without_the_interpreter_s_finalisation(
    tmp_path, capsys, monkeypatch, outcome_code
):
    """Finalising the interpreter while a gloo thread still holds a finished collective's tensors
    aborts a process whose run ended well (-6, "terminate called without an active exception";
    11 of 40 two-process runs of a bare accelerate script on this machine): `ranke` ends such a
    process with os._exit after its output is flushed and its locks released, whatever the
    outcome. A single process exits as any Python program."""
    exits = []

    def record_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", record_exit)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    args = ["toy", "sample", "--n", "2", "--out", str(tmp_path / "images")]
    if outcome_code:
        args = ["posttrain", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "run")]
    code, err = cli(capsys, *args)
    assert exits == [outcome_code] and code == outcome_code and len(err) == (1 if outcome_code else 0)

    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)
    exits.clear()
    assert cli(capsys, *args)[0] == outcome_code and exits == []


def test_two_processes_stop_together_on_a_signal_and_a_killed_one_stops_the_other(tmp_path):
    """One job, four launches (checkpoints at the stop and at the end only): (1) SIGTERM to the
    second process only, once step 1 is logged: both stop after the same step (exit 75) with its
    checkpoint; (2) resumed, the second process is killed in the step after the next: the first
    stops by itself within seconds with one line (exit 69); (3) resumed again from the stop's
    checkpoint, the run ends with the weights and records of (4) an uninterrupted run."""
    run = tmp_path / "run"
    job = launch(run)
    wait_for_step(run, 1, job)
    job[1].send_signal(signal.SIGTERM)
    codes, errors = outcome(job)
    step = records(run)[-1]["step"]
    assert codes == [EXIT_STOPPED, EXIT_STOPPED], errors
    assert errors[0] == [f"ranke: stopped by SIGTERM after step {step}; checkpoint {run}/checkpoints/step_{step:06d}; "
                         "continue with --resume"]  # fmt: skip
    # step 1 when the signal came before the processes passed step 1's end (its record is written first)
    assert 1 <= step <= 3 and checkpoint_entries(run) == ["latest", f"step_{step:06d}"]

    job = launch(run, resume=True)
    wait_for_step(run, step + 1, job)
    job[1].kill()
    killed = time.monotonic()
    job[0].wait(timeout=120)
    seconds = time.monotonic() - killed
    codes, errors = outcome(job)
    print(f"\nthe surviving process stopped {seconds:.2f} s after the other one was killed")
    assert codes == [EXIT_LOST_PROCESS, -signal.SIGKILL] and len(errors[0]) == 1, errors
    assert errors[0][0].startswith("ranke: error: process 0 lost another process of the job (a collective failed: ")
    assert errors[0][0].endswith(f"; relaunch with --resume (it continues from {run}/checkpoints/step_{step:06d})")
    assert records(run)[-1]["stopped"].startswith("process 0 lost another process during step") and seconds < 30

    codes, errors = outcome(launch(run, resume=True))
    assert codes == [0, 0], errors
    reference = tmp_path / "reference"
    codes, errors = outcome(launch(reference))
    assert codes == [0, 0], errors
    for stem in ("policy", "policy_ema", "vq", "vq_ema"):
        name = f"checkpoints/step_000005/{stem}.safetensors"
        assert (run / name).read_bytes() == (reference / name).read_bytes(), f"{stem} differs"
    assert training_records(run) == training_records(reference)


def test_a_hung_process_stops_the_other_after_collective_timeout(tmp_path):
    """A process that stops answering (SIGSTOP: its sockets stay open, as on a hung node) is not
    noticed by the network; the other one's next collective gives up after `collective_timeout`."""
    run = tmp_path / "run"
    job = launch(run, "collective_timeout=3", "steps=30")
    wait_for_step(run, 1, job)
    job[1].send_signal(signal.SIGSTOP)
    hung = time.monotonic()
    try:
        job[0].wait(timeout=120)
        seconds = time.monotonic() - hung
    finally:
        job[1].kill()
    codes, errors = outcome(job)
    print(f"\nthe other process stopped {seconds:.2f} s after one hung (collective_timeout=3)")
    assert codes[0] == EXIT_LOST_PROCESS and len(errors[0]) == 1, errors
    assert "(a collective failed: Timed out waiting 3000ms for recv operation to complete) during step" in errors[0][0]
    assert 3 <= seconds < 30
