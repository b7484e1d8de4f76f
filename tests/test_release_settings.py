"""The release's decoder-stage and ablation settings, on tiny toy post-training runs."""

from __future__ import annotations

import pytest
import torch

from ranke.config import PosttrainConfig
from ranke.train.posttrain_models import Models, build_optimizers

from test_posttrain import records, run


def test_uniform_advantages_reinforce_every_rollout(tmp_path):
    run(tmp_path / "ranked", "mode=policy", "steps=1")
    run(tmp_path / "uniform", "mode=policy", "steps=1", "uniform_advantages=true")
    # first step: ratio 1 and KL 0, so the loss is -mean(A): 0 for group-normalised advantages, -1 for all-ones
    assert records(tmp_path / "ranked")[0]["policy/loss"] == pytest.approx(0.0, abs=1e-6)
    assert records(tmp_path / "uniform")[0]["policy/loss"] == pytest.approx(-1.0, abs=1e-6)


def test_discriminator_loss_weight_scales_the_hinge(tmp_path):
    common = ("mode=decoder", "steps=1", "disc_start=0")
    run(tmp_path / "plain", *common)
    run(tmp_path / "halved", *common, "disc_loss_weight=0.5")
    plain, halved = records(tmp_path / "plain")[0], records(tmp_path / "halved")[0]
    assert plain["disc/loss"] > 0
    assert halved["disc/loss"] == pytest.approx(0.5 * plain["disc/loss"], rel=1e-6)


def test_soft_token_logits_at_rollout_equal_the_current_ones_while_the_policy_is_frozen(tmp_path):
    soft = ("steps=2", "soft_token_weight=0.5")
    run(tmp_path / "current", "mode=decoder", *soft)
    run(tmp_path / "rollout", "mode=decoder", *soft, "soft_token_logits=rollout")
    current, rollout = records(tmp_path / "current"), records(tmp_path / "rollout")
    assert [r["decoder/soft_token"] for r in current] == [r["decoder/soft_token"] for r in rollout]
    # with the policy stage in between, the rollout's logits are the pre-update ones
    run(tmp_path / "both_current", "mode=both", *soft)
    run(tmp_path / "both_rollout", "mode=both", *soft, "soft_token_logits=rollout")
    first = records(tmp_path / "both_current")[0]["decoder/soft_token"]
    assert first != records(tmp_path / "both_rollout")[0]["decoder/soft_token"]


def test_release_decoder_stage_settings_run(tmp_path):
    run(
        tmp_path / "release", "mode=both", "steps=2", "disc_start=0", "clamp_decodes=true", "disc_betas=[0.9, 0.999]",
        "disc_weight_decay=0.01", "disc_loss_weight=0.5", "soft_token_weight=0.5", "soft_token_logits=rollout",
        "soft_token_codebook=raw",
    )  # fmt: skip
    for record in records(tmp_path / "release"):
        assert all(torch.isfinite(torch.tensor(value)) for value in record.values())


def test_discriminator_optimizer_takes_the_configured_betas_and_decay():
    disc = torch.nn.Linear(2, 2)
    models = Models(policy=torch.nn.Linear(2, 2), policy_ema=None, reference=None, vq=torch.nn.Module(), vq_ema=None,
                    disc=disc, perceptual=None)  # fmt: skip
    models.vq.decoder_parameters = lambda: [torch.nn.Parameter(torch.zeros(1))]
    pcfg = PosttrainConfig(disc_betas=(0.9, 0.999), disc_weight_decay=0.01)
    group = build_optimizers(models, pcfg, 0, "cpu")["disc"].optimizer.param_groups[0]
    assert (group["betas"], group["weight_decay"]) == ((0.9, 0.999), 0.01)
    default = build_optimizers(models, PosttrainConfig(), 0, "cpu")["disc"].optimizer.param_groups[0]
    assert (default["betas"], default["weight_decay"]) == ((0.5, 0.9), 0.0)
