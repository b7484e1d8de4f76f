"""Nothing lost and nothing silently wrong: checksummed checkpoints and the fall-back to the newest
intact one, torn metrics lines, one writer per folder, resume settings applied or refused, and
sample folders that resume only the samples they hold."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_posttrain import TINY

from ranke.cli import main
from ranke.runlock import LOCK_FILE, claim_output_dir, release
from ranke.runtime import UserError
from ranke.toy.data import ToyConfig, heldout_prompts
from ranke import checkpoint as checkpoint_lib
from ranke.train.posttrain import train_posttrain
from ranke.train.resume import set_learning_rate
from ranke.train.schedule import warmup_cosine

SETTINGS = [*TINY, "mode=both", "steps=3", "disc_start=1", "save_every=1", "grid_every=100"]
STEMS = ("policy", "policy_ema", "vq", "vq_ema", "discriminator")
PROMPTS = heldout_prompts(ToyConfig())[:4]


def prompt_file(path: Path, prompts: list[str]) -> Path:
    path.write_text("\n".join(prompts) + "\n")
    return path


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def untimed_records(run: Path) -> list[dict]:
    return [
        {key: value for key, value in json.loads(line).items() if not key.startswith("time/")}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, one_thread) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    train_posttrain("toy", str(run), SETTINGS)
    return run


def test_manifest_holds_size_and_sha256_and_a_flipped_byte_is_found(tmp_path):
    tensors = {"policy": {"w": torch.arange(6.0)}}
    path = checkpoint_lib.save_checkpoint(tmp_path, 1, tensors, {"step": 1}, "seed: 0\n")
    manifest = json.loads((path / checkpoint_lib.MANIFEST).read_text())
    weights = path / "policy.safetensors"
    assert manifest["checksums"]["policy.safetensors"] == {
        "size": weights.stat().st_size, "sha256": checkpoint_lib.file_sha256(weights)
    }  # fmt: skip
    assert checkpoint_lib.checkpoint_damage(path) is None
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert checkpoint_lib.checkpoint_damage(path) == "policy.safetensors does not match its sha256 in the manifest"
    weights.write_bytes(bytes(data[:-5]))
    assert "policy.safetensors has" in checkpoint_lib.checkpoint_damage(path)
    with pytest.raises(UserError, match="damaged or incomplete"):
        checkpoint_lib.load_checkpoint(path)


def test_truncated_latest_checkpoint_and_torn_metrics_line_resume_bit_identically(straight_run, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(straight_run, damaged)
    policy = damaged / "checkpoints" / "step_000003" / "policy.safetensors"
    policy.write_bytes(policy.read_bytes()[: policy.stat().st_size // 2])  # a full disk, a partial copy
    with (damaged / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 4, "rew')  # a torn last line

    train_posttrain("toy", str(damaged), SETTINGS, resume=True)
    err = capsys.readouterr().err
    assert "step_000003' is damaged or incomplete (policy.safetensors has" in err
    assert "using checkpoint" in err and "step_000002" in err
    assert "metrics.jsonl:4: dropped a damaged line" in err
    for stem in STEMS:
        name = f"checkpoints/step_000003/{stem}.safetensors"
        assert (straight_run / name).read_bytes() == (damaged / name).read_bytes(), f"{stem} differs"
    assert untimed_records(damaged) == untimed_records(straight_run)


def test_sample_and_eval_fall_back_from_a_damaged_latest_checkpoint(straight_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    (run / "checkpoints" / "step_000003" / "vq.safetensors").write_bytes(b"torn")
    prompts = prompt_file(tmp_path / "prompts.txt", PROMPTS[:1])
    code, out, err = cli(capsys, "sample", "--ckpt", str(run), "--prompts", str(prompts), "--out", str(tmp_path / "s"))
    assert code == 0 and "step_000003' is damaged" in err and json.loads(out)["n"] == 1, err
    provenance = json.loads((tmp_path / "s" / "sampling.json").read_text())
    assert any("step_000002" in name for name in provenance["source"]["files"])
    code, _, err = cli(capsys, "sample", "--ckpt", str(run / "checkpoints" / "step_000003"), "--prompts",
                       str(prompts), "--out", str(tmp_path / "t"))  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1 and "damaged or incomplete (vq.safetensors has" in err


def test_resume_applies_a_new_learning_rate_and_refuses_what_the_state_fixes(straight_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    config = (run / "config.yaml").read_text()
    code, _, err = cli(capsys, "posttrain", "--out", str(run), *SETTINGS, "steps=4")
    assert code == 2 and "already holds checkpoints; pass --resume" in err
    code, _, err = cli(capsys, "posttrain", "--out", str(run), "--resume", *SETTINGS, "steps=4", "mode=policy")
    assert code == 2 and "--resume cannot change posttrain.mode (the run has 'both', now 'policy')" in err
    assert len(err.strip().splitlines()) == 1
    assert (run / "config.yaml").read_text() == config  # refused commands leave the config as it was

    code, _, _ = cli(capsys, "posttrain", "--out", str(run), "--resume", *SETTINGS, "steps=4", "policy_lr=0.5")
    assert code == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["lr/policy"] == 0.5
    assert "policy_lr: 0.5" in (run / "config.yaml").read_text()
    _, trainer_state, _ = checkpoint_lib.load_checkpoint(run / "checkpoints" / "step_000004")
    assert trainer_state["optimizers"]["policy"]["param_groups"][0]["lr"] == 0.5


def test_set_learning_rate_keeps_the_schedule_factor():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, 2, 10, 0.1))
    for _ in range(4):
        optimizer.step()
        schedule.step()
    set_learning_rate(optimizer, 2e-3, schedule)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * warmup_cosine(4, 2, 10, 0.1))
    optimizer.step()
    schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * warmup_cosine(5, 2, 10, 0.1))


def test_a_second_writer_is_refused_and_a_dead_writer_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "ranke.cli", "posttrain", "--out", str(run), *TINY, "steps=500", "save_every=500"]
    env = {**os.environ, "RANKE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        lock, deadline = run / LOCK_FILE, time.monotonic() + 120
        while time.monotonic() < deadline and writer.poll() is None:
            if lock.is_file() and lock.read_text().strip() == str(writer.pid):
                break
            time.sleep(0.05)
        assert lock.read_text().strip() == str(writer.pid), writer.stderr.read().decode()[-2000:]
        code, _, err = cli(capsys, "posttrain", "--out", str(run), "--resume", *TINY, "steps=500")
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"is in use by another ranke process (pid {writer.pid})" in err
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert lock.read_text().strip() == str(writer.pid)  # the dead writer's lock file is left behind
    capsys.readouterr()
    claim_output_dir(run)  # ... and taken over
    assert f"was left locked by pid {writer.pid}, which is no longer running" in capsys.readouterr().err
    assert lock.read_text().strip() == str(os.getpid())
    release(run)
    assert lock.read_text() == ""  # a clean release empties it


def test_a_folder_removed_under_this_process_s_lock_is_locked_afresh(tmp_path):
    """A run folder this process holds, removed and made again (a notebook starting a deleted run
    afresh), gets a new lock file held by this process, which another process cannot take."""
    run = tmp_path / "run"
    claim_output_dir(run)
    claim_output_dir(run)  # held already: no-op
    assert (run / LOCK_FILE).read_text().strip() == str(os.getpid())
    shutil.rmtree(run)
    claim_output_dir(run)
    try:
        assert (run / LOCK_FILE).read_text().strip() == str(os.getpid())
        other = subprocess.run(
            [sys.executable, "-c", f"from ranke.runlock import claim_output_dir; claim_output_dir({str(run)!r})"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert other.returncode == 1 and f"is in use by another ranke process (pid {os.getpid()})" in other.stderr
    finally:
        release(run)
    assert (run / LOCK_FILE).read_text() == ""


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != LOCK_FILE}


def test_sample_folder_resumes_only_the_same_settings(tmp_path, capsys):
    prompts = prompt_file(tmp_path / "prompts.txt", PROMPTS[:3])
    out = tmp_path / "samples"
    base = ["sample", "--prompts", str(prompts), "--out", str(out), "--batch-size", "2"]
    assert cli(capsys, *base)[0] == 0
    first = folder_files(out)
    assert {"00000.png", "00001.png", "00002.png", "captions.jsonl", "sampling.json"} == set(first)

    (out / "00002.png").unlink()  # an interrupted run: the same settings resume it
    assert cli(capsys, *base)[0] == 0
    assert folder_files(out) == first

    for changed in (["--seed", "1"], ["--cfg", "2.0"], ["--batch-size", "3"]):
        code, _, err = cli(capsys, *base, *changed)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "holds samples made with other settings" in err
        assert folder_files(out) == first
    other_prompts = prompt_file(tmp_path / "other.txt", [*PROMPTS[:2], PROMPTS[3]])
    code, _, err = cli(capsys, "sample", "--prompts", str(other_prompts), "--out", str(out), "--batch-size", "2")
    assert code == 2 and "prompts_sha256" in err

    assert cli(capsys, *base, "--seed", "1", "--overwrite")[0] == 0
    replaced = folder_files(out)
    assert json.loads(replaced["sampling.json"])["seed"] == 1 and replaced["00000.png"] != first["00000.png"]

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "00000.png").write_bytes(first["00000.png"])
    code, _, err = cli(capsys, "sample", "--prompts", str(prompts), "--out", str(unknown))
    assert code == 2 and "images of unknown origin" in err


def test_an_intact_checkpoint_is_hashed_once_until_a_file_changes(tmp_path, monkeypatch):
    """Resolving a run directory and then loading its checkpoint verifies it twice; the second
    check trusts the first while no file's size or mtime has changed, and never for files written
    within the racy window."""
    path = checkpoint_lib.save_checkpoint(tmp_path, 1, {"policy": {"w": torch.arange(6.0)}}, {"step": 1}, "seed: 0\n")
    hashed = []
    real_sha256 = checkpoint_lib.file_sha256
    monkeypatch.setattr(checkpoint_lib, "file_sha256", lambda file: hashed.append(Path(file).name) or real_sha256(file))
    assert checkpoint_lib.checkpoint_damage(path) is None and checkpoint_lib.checkpoint_damage(path) is None
    assert hashed.count("policy.safetensors") == 2  # just written: racy, hashed every time
    old = time.time() - 10
    for file in path.iterdir():
        os.utime(file, (old, old))
    hashed.clear()
    checkpoint_lib.checkpoint_damage(path)
    checkpoint_lib.load_checkpoint(path)
    assert hashed.count("policy.safetensors") == 1
    weights = path / "policy.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, (old + 1, old + 1))  # same size, another mtime
    assert checkpoint_lib.checkpoint_damage(path) == "policy.safetensors does not match its sha256 in the manifest"
