"""The post-training recipe end to end on tiny toy settings: logging, exact resume, gradient
isolation between the stages, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_logging import assert_tensorboard_matches_jsonl

from ranke import config as config_lib
from ranke.algo.decoder import DecoderWeights
from ranke.assets import asset_path
from ranke.checkpoint import latest_checkpoint, load_checkpoint
from ranke.cli import main
from ranke.config import RunConfig
from ranke.toy.verifier import score_image
from ranke.models.vq import to_model_range, to_unit_range
from ranke.train.posttrain import (
    collect_rollout,
    decoder_loss,
    decoder_weights,
    next_prompts,
    select_rollouts,
    soft_decode,
    start_posttrain,
    train_posttrain,
)
from ranke.train.prompts import build_prompt_source

# fp32: these tests compare values exactly, and precision=auto picks bf16 on a CPU with native bf16
TINY = ["prompts_per_step=2", "group_size=2", "grid_prompts=2", "eval_samples=0", "deterministic=true", "seed=3", "precision=fp32"]
# a LoRA adapter on the policy (ranke.models.lora; tests/test_lora.py)
LORA = ["posttrain.lora.enabled=true", "posttrain.lora.rank=4", "posttrain.lora.alpha=8"]


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
    assert_tensorboard_matches_jsonl(both_run)
    assert (both_run / "samples_000003.png").is_file()


def test_logged_decoder_loss_is_the_weighted_sum_of_its_logged_terms(both_run):
    """The recipe wires every term into the objective with its configured weight (toy defaults:
    recon 1, rank-GAN 1 x disc_weight 0.5 once the discriminator starts at step 1, lambda_c 10,
    reward 0.01; the run sets the soft-token weight to 0.5)."""
    rows = records(both_run)
    for row in rows:
        disc_factor = 1.0 if row["step"] - 1 >= 1 else 0.0
        expected = (
            row["decoder/recon_anchor"] + 0.5 * disc_factor * row["decoder/rank_gan"]
            + 10.0 * row["decoder/consistency"] + 0.01 * row["decoder/reward_backprop"] + 0.5 * row["decoder/soft_token"]
        )  # fmt: skip
        assert row["decoder/consistency_weight"] == 10.0
        assert row["decoder/loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # every term is live by the last step (the online decoder has moved away from its EMA)
    terms = ("recon_anchor", "rank_gan", "consistency", "reward_backprop", "soft_token")
    assert all(rows[-1][f"decoder/{term}"] != 0.0 for term in terms)


def test_logged_policy_loss_is_the_surrogate_plus_kl_coef_times_the_anchor(both_run):
    """The policy stage's objective is clipped surrogate + beta * Omega with the config's beta
    (toy default 0.05); the anchor is live once the policy has left its reference."""
    rows = records(both_run)
    assert rows[-1]["policy/kl"] > 0.0
    for row in rows:
        expected = row["policy/surrogate"] + 0.05 * row["policy/kl"]
        assert row["policy/loss"] == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_consistency_ramps_from_zero_to_lambda_c_by_default():
    """`linear` / `cosine` ramp from 0 to lambda_c over the first quarter of the steps unless told
    otherwise; the Janus preset (lambda_c 5) ramps up to 5."""
    cfg = config_lib.load(RunConfig, "toy", ["posttrain.steps=200", "posttrain.consistency_schedule=linear"])
    pcfg = cfg.posttrain
    assert pcfg.consistency_span == (0, 50)
    assert [decoder_weights(pcfg, step, 1.0).consistency for step in (0, 10, 25, 50, 199)] == [0.0, 2.0, 5.0, 10.0, 10.0]
    cosine = dataclasses.replace(pcfg, consistency_schedule="cosine")
    assert decoder_weights(cosine, 25, 1.0).consistency == pytest.approx(5.0)  # half way: 10 * (1 - cos(pi / 2)) / 2
    assert decoder_weights(cosine, 10, 1.0).consistency == pytest.approx(5 * (1 - math.cos(math.pi / 5)))  # t = 1/5
    janus = config_lib.load(RunConfig, "janus_pro_1b_clip", ["posttrain.consistency_schedule=linear"]).posttrain
    end = janus.steps // 4
    ramp = [decoder_weights(janus, step, 1.0).consistency for step in (0, end // 2, end, janus.steps - 1)]
    assert ramp == [0.0, 2.5, 5.0, 5.0]
    # the preset's own schedule: constant lambda_c
    assert decoder_weights(config_lib.load(RunConfig, "janus_pro_1b_clip").posttrain, 0, 1.0).consistency == 5.0
    # and every other weight is the config's
    weights = decoder_weights(dataclasses.replace(pcfg, recon_weight=2.0, rank_gan_weight=3.0, disc_weight=0.25,
                                                  reward_backprop_weight=0.5, soft_token_weight=0.125), 60, 0.0)  # fmt: skip
    assert weights == DecoderWeights(recon=2.0, rank_gan=3.0, disc_weight=0.25, disc_factor=0.0, consistency=10.0,
                                     reward=0.5, soft=0.125)  # fmt: skip


DISTINCT_WEIGHTS = [
    "recon_weight=2", "perceptual_weight=0.75", "rank_gan_weight=3", "disc_weight=0.25", "consistency_weight=7",
    "reward_backprop_weight=0.5", "soft_token_weight=0.125", "recon_kind=l1", "disc_start=0", "rank_top_k=2",
]  # fmt: skip


def test_decoder_loss_is_the_method_sum_written_out_from_the_networks(tmp_path):
    """`decoder_loss` against METHOD.md's objective spelled out from the run's own networks, with
    a different weight on every term, so that dropping a term or giving it another's weight fails:
    L = w_recon (L1 + w_p LPIPS + lambda_d lambda_adapt L_gen) + w_rankgan lambda_d L_rankgan
        + lambda_c L_consist + w_reward L_reward + w_soft L_soft."""
    run_, _ = start_posttrain("toy", str(tmp_path), [*TINY, *DISTINCT_WEIGHTS], resume=False)
    models, perceptual, disc, vq = run_.models, run_.models.perceptual, run_.models.disc, run_.models.vq
    prompts, real_images = next_prompts(run_)
    rollout = collect_rollout(run_, prompts, {})
    with torch.no_grad():  # move the online decoder off its EMA copy, so L_consist is not zero
        vq.last_layer.add_(0.05 * torch.randn(vq.last_layer.shape, generator=torch.Generator().manual_seed(0)))
    selection = select_rollouts(rollout, real_images.shape[0], run_.pcfg, step=2)
    assert selection.weights.max() > selection.weights.min() + 0.01  # rank weights that matter
    real = to_model_range(real_images)
    with torch.no_grad():
        codes = vq.encode_codes(real)
    recon = vq.decode_codes(codes)
    loss, logged = decoder_loss(run_, rollout, selection, real, recon, step=2, disc_factor=1.0)

    pixel = (recon - real).abs().mean()
    nll = pixel + 0.75 * perceptual(real, recon).mean()
    generator = -disc(recon).float().mean()
    grad_nll, grad_gen = (torch.autograd.grad(t, vq.last_layer, retain_graph=True)[0].norm() for t in (nll, generator))
    adaptive = (grad_nll / (grad_gen + 1e-4)).clamp(0.0, 1e4)
    recon_anchor = nll + 0.25 * adaptive * generator
    decoded = vq.decode_codes(selection.tokens)
    rank_gan = -(selection.weights * disc(decoded).float().flatten(1).mean(dim=1)).mean()
    consistency = perceptual(decoded, models.vq_ema.module.decode_codes(selection.tokens)).mean()
    reward = -(selection.weights * run_.reward.differentiable_score(to_unit_range(decoded), selection.prompts)).mean()
    soft_decoded = soft_decode(run_.backbone, models.policy, vq, rollout, selection.indices, run_.pcfg)
    soft = ((soft_decoded - decoded) ** 2).mean()
    expected = 2 * recon_anchor + 3 * 0.25 * rank_gan + 7 * consistency + 0.5 * reward + 0.125 * soft

    def number(value) -> float:
        return float(value.detach()) if torch.is_tensor(value) else float(value)

    for name, value in [("pixel", pixel), ("recon_anchor", recon_anchor), ("generator", generator),
                        ("rank_gan", rank_gan), ("consistency", consistency), ("reward_backprop", reward),
                        ("soft_token", soft)]:  # fmt: skip
        assert number(value) != 0.0, name
        assert number(logged[f"decoder/{name}"]) == pytest.approx(number(value), rel=1e-5, abs=1e-7), name
    assert number(loss) == pytest.approx(number(expected), rel=1e-5)


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


@pytest.mark.parametrize(("mode", "policy"), [("both", "whole"), ("pixel", "whole"), ("pixel_and_decoder", "whole"),
                                              ("both", "lora"), ("pixel", "lora")])  # fmt: skip
def test_resume_after_kill_is_bit_exact(tmp_path, mode, policy):
    """With LoRA the checkpoint holds the adapter, its AdamW moments and its EMA alone."""
    settings = [*TINY, f"mode={mode}", "steps=6", "disc_start=2", "save_every=1", "grid_every=100", "policy_ema_every=2"]
    settings += LORA if policy == "lora" else []
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
    for stem in ("policy", "policy_ema", "vq", "vq_ema", *(["discriminator"] if mode != "pixel" else [])):
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
        (["group_size=1"], "config key 'posttrain.group_size' is 1; allowed: a finite number >= 2"),
        (["mode=decoders"], "config key 'posttrain.mode' is 'decoders'; allowed: one of policy, decoder, both, pixel, pixel_and_decoder"),
        (["rewards={toy_clip: 1.0, clipp: 1.0}"], "unknown reward 'clipp'"),
        (["kl_kind=k4"], "config key 'posttrain.kl_kind' is 'k4'; allowed: one of squared, k3"),
        (["loss_type=ppo"], "config key 'posttrain.loss_type' is 'ppo'; allowed: one of grpo, dr_grpo, dapo, gspo"),
        (["clip_eps_high=0"], "config key 'posttrain.clip_eps_high' is 0.0; allowed: a finite number > 0"),
        (["gspo_clip_eps=1"], "config key 'posttrain.gspo_clip_eps' is 1.0; allowed: a number in (0, 1)"),
        (["dynamic_sampling_draws=-1"], "config key 'posttrain.dynamic_sampling_draws' is -1; allowed: a finite number >= 0"),
        (["consistency_schedule=ramp"], "config key 'posttrain.consistency_schedule' is 'ramp'; allowed: one of none, linear, cosine"),
        (["consistency_schedule=linear", "consistency_end_step=0"],
         "posttrain.consistency_start_step=0 must be below consistency_end_step=0"),
        (["consistency_schedule=cosine", "steps=8", "consistency_start_step=2"],
         "posttrain.consistency_start_step=2 must be below consistency_end_step=2"),  # end: steps // 4
        (["consistency_schedule=linear", "steps=100", "consistency_end_step=300"],
         "posttrain.consistency_end_step=300 must be <= steps=100"),
        (["consistency_schedule=linear", "consistency_start_weight=-1"],
         "config key 'posttrain.consistency_start_weight' is -1.0; allowed: a finite number >= 0"),
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
    # the same run from another prompt file rolls out other prompts: its rewards differ
    other = tmp_path / "other.txt"
    other.write_text("a small green triangle above a large yellow square\n")
    run(tmp_path / "other", f"prompts={other}", "mode=policy", "steps=1", "grid_every=100")
    assert records(tmp_path / "other")[0]["reward"] != records(tmp_path / "run")[0]["reward"]
    # the configured source draws only the file's prompts, each with a real image that shows it
    cfg = config_lib.load(RunConfig, "toy", [f"posttrain.prompts={prompts}"])
    drawn, images = build_prompt_source(cfg, 64, np.random.default_rng(0)).next_batch(8)
    assert set(drawn) == {"a large red circle", "a small blue square"}
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert all(score_image(image, prompt).correct for image, prompt in zip(pixels, drawn))


def test_image_caption_folder_drives_the_rollouts_and_is_checkpointed(tmp_path):
    from ranke.toy.tools import write_samples

    write_samples(6, tmp_path / "data", split="train", seed=5)
    run(tmp_path / "run", f"data={tmp_path / 'data'}", "mode=both", "steps=2", "disc_start=0", "grid_every=100")
    _, trainer_state, _ = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert trainer_state["data"]["epoch"] == 1 and trainer_state["data"]["position"] == 4  # 2 steps x 2 prompts


@pytest.mark.parametrize("mode", ["policy", "both", "pixel"])
@pytest.mark.parametrize("loss_type", ["dr_grpo", "dapo", "gspo"])
def test_each_policy_loss_runs_and_logs_finite_values(tmp_path, loss_type, mode):
    run(tmp_path, f"mode={mode}", "steps=1", "save_every=1", "grid_every=100", f"loss_type={loss_type}")
    (row,) = records(tmp_path)
    names = ("loss", "surrogate", "kl", "clip_fraction", "ratio_mean", "grad_norm", *(["likelihood"] if mode == "pixel" else []))
    for name in names:
        assert math.isfinite(row[f"policy/{name}"]), name
    assert row["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # the first pass is on-policy


def test_dynamic_sampling_refills_flat_groups(tmp_path, monkeypatch):
    """The first draw's groups are made to look flat: one extra draw refills the batch with groups
    that have a spread; without draws left, flat groups fill it."""
    from ranke.train import posttrain

    calls = []

    def first_draw_flat(rewards, group_size):
        calls.append(rewards.numel())
        spread = torch.ones(rewards.numel() // group_size, dtype=torch.bool)
        return spread if len(calls) > 1 else ~spread

    monkeypatch.setattr(posttrain, "spread_groups", first_draw_flat)
    run(tmp_path / "refill", "mode=both", "steps=1", "save_every=1", "grid_every=100", "disc_start=0", "loss_type=dapo",
        "dynamic_sampling_draws=3")  # fmt: skip
    (row,) = records(tmp_path / "refill")
    assert calls == [4, 4]  # 2 prompts x 2 rollouts, twice
    assert row["dynamic_sampling/draws"] == 1 and row["dynamic_sampling/spread_groups"] == 1.0
    assert math.isfinite(row["policy/loss"]) and math.isfinite(row["decoder/loss"])

    def always_flat(rewards, group_size):
        calls.append(rewards.numel())
        return torch.zeros(rewards.numel() // group_size, dtype=torch.bool)

    calls.clear()
    monkeypatch.setattr(posttrain, "spread_groups", always_flat)
    run(tmp_path / "bound", "mode=policy", "steps=1", "save_every=1", "grid_every=100", "dynamic_sampling_draws=2")
    (row,) = records(tmp_path / "bound")
    assert len(calls) == 3 and row["dynamic_sampling/draws"] == 2 and row["dynamic_sampling/spread_groups"] == 0.0
