"""The post-training recipe end to end on tiny toy settings: logging, exact resume, gradient
isolation between the stages, bad input."""

from __future__ import annotations

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

from ranke.assets import asset_path
from ranke.checkpoint import latest_checkpoint, load_checkpoint
from ranke.cli import main
from ranke.train.posttrain import train_posttrain

TINY = ["prompts_per_step=2", "group_size=2", "grid_prompts=2", "eval_samples=0", "deterministic=true", "seed=3"]


def run(out: Path, *overrides: str, resume: bool = False) -> None:
    train_posttrain("toy", str(out), [*TINY, *overrides], resume=resume)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint(out: Path, step: int, stem: str) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step_{step:06d}" / f"{stem}.safetensors")


@pytest.fixture(scope="module")
def both_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("both")
    run(out, "mode=both", "steps=3", "disc_start=1", "save_every=3", "grid_every=3", "soft_token_weight=0.5")
    return out


def test_first_step_is_on_policy_with_zero_kl(both_run):
    first = records(both_run)[0]
    assert first["policy/kl"] == 0.0  # policy == reference before the first update
    assert first["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # sampler vs teacher forcing
    assert first["policy/clip_fraction"] == 0.0


def test_every_term_and_timing_is_logged_and_finite(both_run):
    rows = records(both_run)
    assert [row["step"] for row in rows] == [1, 2, 3]
    expected = {
        "reward", "reward/toy_clip_mean", "reward/toy_clip_std", "reward/zero_std_groups", "policy/kl",
        "policy/clip_fraction", "policy/ratio_mean", "policy/entropy", "lr/policy", "lr/decoder",
        "decoder/recon_anchor", "decoder/rank_gan", "decoder/consistency", "decoder/reward_backprop",
        "decoder/soft_token", "decoder/weights_entropy", "disc/logits_real", "disc/logits_fake",
        "time/rollout", "time/logprobs", "time/update", "time/decode", "time/reward", "time/decoder",
    }  # fmt: skip
    for row in rows:
        assert expected <= set(row)
        assert all(torch.isfinite(torch.tensor(float(value))) for value in row.values())
    assert rows[-1]["decoder/rank_gan"] != 0.0 and rows[-1]["decoder/soft_token"] > 0.0
    assert list((both_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (both_run / "samples_000003.png").is_file()


def test_decoder_stage_moves_only_decoder_and_post_quant_conv(both_run):
    start = load_file(asset_path("tokenizer"))
    end = checkpoint(both_run, 3, "vq")
    for name, value in start.items():
        same = torch.equal(value.float(), end[name].float())
        if name.startswith(("encoder.", "quant_conv.", "quantize.")):
            assert same, f"{name} changed: the token space must stay frozen"
    changed = [name for name in start if not torch.equal(start[name].float(), end[name].float())]
    assert any(name.startswith("decoder.") for name in changed)
    assert any(name.startswith("post_quant_conv.") for name in changed)


def test_policy_mode_never_changes_the_decoder_and_decoder_mode_never_the_policy(tmp_path):
    run(tmp_path / "policy", "mode=policy", "steps=2", "save_every=2", "grid_every=100")
    start_vq = load_file(asset_path("tokenizer"))
    for stem in ("vq", "vq_ema"):
        end = checkpoint(tmp_path / "policy", 2, stem)
        assert all(torch.equal(start_vq[name].float(), end[name]) for name in start_vq)
    start_policy = load_file(asset_path("policy"))
    assert not all(
        torch.equal(start_policy[n].float(), v) for n, v in checkpoint(tmp_path / "policy", 2, "policy").items()
    )

    run(tmp_path / "decoder", "mode=decoder", "steps=2", "disc_start=0", "save_every=2", "grid_every=100")
    for stem in ("policy", "policy_ema"):
        end = checkpoint(tmp_path / "decoder", 2, stem)
        assert all(torch.equal(start_policy[name].float(), end[name]) for name in start_policy)


def test_resume_after_kill_is_bit_exact(tmp_path):
    settings = [*TINY, "mode=both", "steps=6", "disc_start=2", "save_every=1", "grid_every=100", "policy_ema_every=2"]
    train_posttrain("toy", str(tmp_path / "straight"), settings)

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "ranke.cli", "posttrain", "--out", str(killed), *settings]
    env = {**os.environ, "RANKE_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = killed / "checkpoints" / "step_000003" / "manifest.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists(), process.stderr.read().decode()[-2000:]
    assert not (killed / "checkpoints" / "step_000006").exists(), "the run finished before it was killed"

    train_posttrain("toy", str(killed), settings, resume=True)
    for stem in ("policy", "policy_ema", "vq", "vq_ema", "discriminator"):
        straight = (tmp_path / "straight" / "checkpoints" / "step_000006" / f"{stem}.safetensors").read_bytes()
        resumed = (killed / "checkpoints" / "step_000006" / f"{stem}.safetensors").read_bytes()
        assert straight == resumed, f"{stem} differs after resume"
    untimed = lambda rows: [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]  # noqa: E731
    assert untimed(records(killed)) == untimed(records(tmp_path / "straight"))


def test_existing_run_needs_resume(both_run, capsys):
    with pytest.raises(SystemExit):
        main(["posttrain", "--out", str(both_run), *TINY, "steps=3"])
    assert "already holds checkpoints; pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stepz=3"], "unknown config key 'stepz' (did you mean 'steps'?)"),
        (["group_size=1"], "group_size=1: GRPO and rank selection need at least 2 rollouts per prompt"),
        (["mode=decoders"], "unknown mode 'decoders'"),
        (["rewards={toy_clip: 1.0, clipp: 1.0}"], "unknown reward 'clipp'"),
    ],
)
def test_bad_settings_give_one_line_and_exit_2(tmp_path, capsys, overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["posttrain", "--out", str(tmp_path / "run"), *overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_empty_or_off_grammar_prompt_file_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(SystemExit):
        main(["posttrain", "--out", str(tmp_path / "run"), f"prompts={empty}"])
    assert "holds no prompts" in capsys.readouterr().err
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("a photo of a cat\n")
    with pytest.raises(SystemExit):
        main(["posttrain", "--out", str(tmp_path / "run"), f"prompts={wrong}"])
    assert "wrong.txt" in capsys.readouterr().err


def test_prompt_file_drives_the_rollouts(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle\na small blue square\n")
    run(tmp_path / "run", f"prompts={prompts}", "mode=policy", "steps=1", "grid_every=100")
    assert records(tmp_path / "run")[0]["step"] == 1


def test_image_caption_folder_drives_the_rollouts_and_is_checkpointed(tmp_path):
    from ranke.toy.tools import write_samples

    write_samples(6, tmp_path / "data", split="train", seed=5)
    run(tmp_path / "run", f"data={tmp_path / 'data'}", "mode=both", "steps=2", "disc_start=0", "grid_every=100")
    _, trainer_state, _ = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert trainer_state["data"]["epoch"] == 1 and trainer_state["data"]["position"] == 4  # 2 steps x 2 prompts
