"""Data-parallel post-training: 2 CPU processes (gloo, launched by torchrun) against 1 process
with the same global batch, and a resume after the job is killed.

Exactness: prompts are split across processes and every process uses its rows of the global
batch's random draws, so rollouts are the same tokens; gradients are averages of per-process
means, equal to the one-process mean up to summation order. The decoder stage runs with the
discriminator off (`disc_start` after the last step): with it on, the adaptive GAN weight and
the discriminator's BatchNorm statistics are per process, a valid data-parallel run that is not
the one-process run. Adam's normalisation magnifies rounding differences of near-zero gradients
to up to a learning-rate step, in a few elements per million (`assert_same_weights`); the released
policy learning rate (1e-5) keeps those small.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_logging import assert_tensorboard_matches_jsonl
from test_posttrain import LORA

from ranke.sample_folder import ModelChoice
from ranke.train.posttrain import train_posttrain

ON_CPU = ModelChoice(overrides=("device=cpu",))  # the committed toy assets

SETTINGS = ["mode=both", "prompts_per_step=4", "group_size=2", "grid_prompts=2", "eval_samples=0", "disc_start=100",
            "policy_lr=1e-5", "seed=3", "save_every=1", "grid_every=100", "check_replicas_every=1", "policy_ema_every=2",
            "precision=fp32"]  # fmt: skip  # one and two processes agree to fp32 rounding, not to bf16's
ENV = {**os.environ, "RANKE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def torchrun(out: Path, *overrides: str, resume: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ranke.cli", "posttrain", "--out", str(out), *SETTINGS, *overrides]  # fmt: skip
    return subprocess.Popen(command + (["--resume"] if resume else []), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def finish(process: subprocess.Popen) -> None:
    output = process.communicate(timeout=300)[0].decode()
    assert process.returncode == 0, output[-3000:]


LARGEST_LR = 5e-5  # the toy decoder's learning rate; SETTINGS set the policy's to 1e-5


def assert_same_weights(a: Path, b: Path, step: int, atol: float) -> None:
    """Weights equal within `atol`, but for a handful of elements per million: AdamW divides each
    gradient by its running RMS, so an element whose gradient is zero up to rounding (summed in a
    different order over two processes) takes a step of up to the learning rate, of either sign.
    A wrong batch share moves most elements, far beyond both bounds."""
    for stem in ("policy", "policy_ema", "vq", "vq_ema"):
        first = load_file(a / "checkpoints" / f"step_{step:06d}" / f"{stem}.safetensors")
        second = load_file(b / "checkpoints" / f"step_{step:06d}" / f"{stem}.safetensors")
        assert first.keys() == second.keys()
        diff = torch.cat([(first[name] - second[name]).abs().flatten() for name in first])
        outliers = int((diff > atol).sum())
        assert outliers <= 1e-4 * diff.numel() and diff.max() <= step * LARGEST_LR, (
            f"{stem}: {outliers} of {diff.numel()} elements differ by more than {atol}, at most {diff.max():.2e}"
        )


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("one") / "run"
    train_posttrain("toy", str(out), [*SETTINGS, "steps=4"])
    torch.set_num_threads(threads)
    return out


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc: torchrun starts each worker in a session of
    its own, so killing the launcher's process group leaves the workers running."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree = [root]
    for pid in tree:
        tree += [child for child, parent in parents.items() if parent == pid]
    return tree


def has_exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def kill_after_second_checkpoint_and_resume(out: Path, *overrides: str) -> None:
    """SIGKILL to the launcher and every worker at once, as a cluster ends a job; the resume
    starts once they are gone (the kernel frees a dead worker's lock when it exits)."""
    job = torchrun(out, "steps=4", *overrides)
    marker = out / "checkpoints" / "step_000002" / "manifest.json"
    deadline = time.monotonic() + 240
    while not marker.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    tree = process_tree(job.pid)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    job.wait()
    deadline = time.monotonic() + 30
    while not all(has_exited(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists() and not (out / "checkpoints" / "step_000004").exists()
    finish(torchrun(out, "steps=4", *overrides, resume=True))


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_match_one_and_resume_after_a_kill(tmp_path, one_process_run, sharding):
    """DDP replicates the policy; FSDP splits its parameters, gradients and AdamW states over the
    two processes, gathers them for sampling, the EMA update and checkpoints (whole weights)."""
    # replicas are checked equal after every step (check_replicas_every=1 raises otherwise)
    finish(torchrun(tmp_path / "two", "steps=4", f"policy_sharding={sharding}"))
    assert_same_weights(one_process_run, tmp_path / "two", 4, atol=1e-5)

    kill_after_second_checkpoint_and_resume(tmp_path / "killed", f"policy_sharding={sharding}")
    assert_same_weights(tmp_path / "two", tmp_path / "killed", 4, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, sharding",
    [
        (["loss_type=dr_grpo"], "fsdp"),
        (["loss_type=dapo", "dynamic_sampling_draws=1"], "ddp"),
        # greedy sampling: every group's rollouts are alike, so each step refills up to its bound
        (["loss_type=dapo", "dynamic_sampling_draws=2", "sampling.top_k=1"], "ddp"),
        (["loss_type=gspo"], "fsdp"),
        (["mode=pixel"], "ddp"),
        (["mode=pixel_and_decoder"], "fsdp"),
    ],
    ids=["dr_grpo_fsdp", "dapo", "dapo_refills", "gspo_fsdp", "pixel", "pixel_and_decoder_fsdp"],
)
def test_two_processes_match_one_for_each_policy_loss_and_pixel_mode(tmp_path, one_thread, overrides, sharding):
    """Every loss averages per-sequence (or, for DAPO, per-token) terms over the equal shares of the
    processes, and the pixel rollout draws its noise and predictions for the global batch, so two
    processes (the policy replicated or sharded) train the one-process weights; DAPO's refill
    counts spread groups over both."""
    train_posttrain("toy", str(tmp_path / "one"), [*SETTINGS, "steps=2", *overrides])
    finish(torchrun(tmp_path / "two", "steps=2", *overrides, f"policy_sharding={sharding}"))
    assert_same_weights(tmp_path / "one", tmp_path / "two", 2, atol=1e-5)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")}  # fmt: skip
    for one, two in zip(rows["one"], rows["two"]):
        assert one["reward"] == pytest.approx(two["reward"], rel=1e-5, abs=1e-6)
        assert one.get("dynamic_sampling/draws") == two.get("dynamic_sampling/draws")
    if "sampling.top_k=1" in overrides:
        assert [row["dynamic_sampling/draws"] for row in rows["two"]] == [2, 2]


def test_two_process_sampling_writes_the_images_of_one_process_and_resumes(tmp_path):
    """8 prompts in batches of 4: each process samples 2 rows of every batch. (A 1-row share would
    run matrix-vector products, whose summation order differs from the batched products, so a
    token drawn right at a probability boundary could differ.)"""
    import numpy as np
    from PIL import Image

    from ranke.sample_folder import sample_prompts_to_dir
    from ranke.toy.data import heldout_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(heldout_prompts()[:8]) + "\n")
    sample_prompts_to_dir(out_dir=str(tmp_path / "one"), model=ON_CPU, prompts_file=str(prompts), seed=5, batch_size=4)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ranke.cli",
               "sample", "--prompts", str(prompts), "--out", str(tmp_path / "two"), "--seed", "5", "--batch-size", "4"]  # fmt: skip
    finish(subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))

    def folder(path: Path) -> dict:
        return {f.name: np.array(Image.open(f)) for f in sorted(path.glob("*.png"))}

    one, two = folder(tmp_path / "one"), folder(tmp_path / "two")
    assert list(one) == [f"{i:05d}.png" for i in range(8)] and list(two) == list(one)
    assert all(np.array_equal(one[name], two[name]) for name in one)
    assert (tmp_path / "one" / "captions.jsonl").read_text() == (tmp_path / "two" / "captions.jsonl").read_text()

    # an interrupted run: the missing batch is sampled again, identically; complete batches are kept
    (tmp_path / "two" / "00005.png").unlink()
    kept = (tmp_path / "two" / "00000.png").stat().st_mtime_ns
    sample_prompts_to_dir(out_dir=str(tmp_path / "two"), model=ON_CPU, prompts_file=str(prompts), seed=5, batch_size=4)
    assert np.array_equal(np.array(Image.open(tmp_path / "two" / "00005.png")), one["00005.png"])
    assert (tmp_path / "two" / "00000.png").stat().st_mtime_ns == kept


def test_two_process_toy_eval_gives_the_metrics_of_one_process(tmp_path):
    """Each process samples and scores its rows of every batch; the scores are gathered, so
    every metric (FD, token KL, verifier, rewards, manifold metrics, round trips) equals the
    one-process evaluation."""
    import json

    from ranke.eval.evaluate import evaluate_to_dir

    one = evaluate_to_dir(out_dir=tmp_path / "one", model=ON_CPU, n=12, seed=2, batch_size=6)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ranke.cli",
               "eval", "--out", str(tmp_path / "two"), "--num-prompts", "12", "--seed", "2", "--batch-size", "6"]  # fmt: skip
    finish(subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key in ("reward", "clip_score", "fd", "token_kl", "token_kl_per_position", "verifier_accuracy", "precision",
                "recall", "density", "coverage", "roundtrip_agreement", "roundtrip_agreement_real"):  # fmt: skip
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    assert two["verifier_by_num_objects"] == one["verifier_by_num_objects"]


TINY_TOKENIZER = ["device=cpu", "precision=fp32", "vq.codebook_size=64", "vq.base_channels=8", "vq.z_channels=16", "vq.norm_groups=4",
                  "vq.encoder_ch_mult=[1,1,2,2]", "vq.decoder_ch_mult=[1,1,2,2]", "tokenizer.batch_size=4",
                  "tokenizer.eval_images=8", "tokenizer.disc_start=100", "tokenizer.disc_channels=8",
                  "tokenizer.grid_every=100", "tokenizer.restart_dead_codes_every=2", "tokenizer.steps=4"]  # fmt: skip
TINY_SFT = ["device=cpu", "precision=fp32", "sft.batch_size=4", "sft.steps=3", "sft.grid_every=100", "sft.eval_samples=4",
            "sft.eval_prompts=2", "sft.warmup_steps=1"]  # fmt: skip


@pytest.mark.parametrize("recipe, settings, stem", [("train-tokenizer", TINY_TOKENIZER, "vq"), ("sft", TINY_SFT, "policy")])
def test_two_process_tokenizer_and_sft_match_one_process(tmp_path, one_thread, recipe, settings, stem):
    """Each process trains on its half of every batch (SFT: DDP; tokenizer: averaged gradients,
    and the codebook's usage window and dead-code restarts read the gathered batch), so the
    weights are those of one process. The tokenizer's discriminator is off: its adaptive weight
    and BatchNorm statistics are per process by design."""
    from ranke.train.sft import train_sft
    from ranke.train.tokenizer import train_tokenizer

    train = {"train-tokenizer": train_tokenizer, "sft": train_sft}[recipe]
    train("toy", str(tmp_path / "one"), settings)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ranke.cli",
               recipe, "--out", str(tmp_path / "two"), *settings]  # fmt: skip
    finish(subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    last = sorted((tmp_path / "one" / "checkpoints").glob("step_*"))[-1].name
    one = load_file(tmp_path / "one" / "checkpoints" / last / f"{stem}.safetensors")
    two = load_file(tmp_path / "two" / "checkpoints" / last / f"{stem}.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0, msg=name)
    rows = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())  # written once
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert_tensorboard_matches_jsonl(tmp_path / "two")


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_with_a_lora_adapter_match_one(tmp_path, sharding):
    """A LoRA adapter on a sharded policy: the frozen base is split like the rest, the adapter, its
    AdamW moments and EMA are gathered alone for checkpoints; two processes agree with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_posttrain("toy", str(tmp_path / "one"), [*SETTINGS, *LORA, "steps=2"])
    torch.set_num_threads(threads)
    finish(torchrun(tmp_path / "two", "steps=2", f"policy_sharding={sharding}", *LORA))
    assert_same_weights(tmp_path / "one", tmp_path / "two", 2, atol=1e-5)
    adapter = load_file(tmp_path / "two" / "checkpoints" / "step_000002" / "policy.safetensors")
    assert adapter and all(".lora_" in name for name in adapter)
