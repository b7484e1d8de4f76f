"""The pixel modes (VA-π's alignment of the policy, alone and with RankE's decoder stage) on tiny
toy settings: the rollout and the policy objective written out from the run's own networks, which
networks train, and the non-finite guard on the pixel loss. Resume, every loss type and the bad
settings are in test_posttrain.py's tables; two processes in test_distributed.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_faults import assert_all_finite, nan_on_calls, same, strict_records, weights
from test_posttrain import TINY, checkpoint, records, run

from ranke.assets import asset_path
from ranke.models.vq import to_model_range
from ranke.train import posttrain
from ranke.train.pixel_rollout import collect_pixel_rollout
from ranke.train.posttrain import next_prompts, start_posttrain, train_posttrain

# distinct weights, so that swapping or dropping one shows
WEIGHTS = ["pixel_weight=2.0", "pixel_perceptual_weight=0.5", "likelihood_weight=0.3", "kl_coef=0.05"]


def test_pixel_rollout_is_vapi_written_out_from_the_networks(tmp_path):
    """Real codes z* from the frozen encoder; one shared corrupted context per image, equal to z*
    where not replaced; predictions whose recorded log-probs are the policy's (and the
    reference's) teacher-forced log-probs on that context; reward -(2 MSE + 0.5 perceptual) of
    their EMA decodes against the real image, in [-1, 1]."""
    run_, _ = start_posttrain("toy", str(tmp_path), [*TINY, "mode=pixel", "group_size=4", *WEIGHTS], resume=False)
    models, backbone = run_.models, run_.backbone
    prompts, real_images = next_prompts(run_)
    rollout = collect_pixel_rollout(run_, prompts, real_images)
    real = to_model_range(real_images)
    codes = models.vq.encode_codes(real).flatten(1)
    group = 4
    assert rollout.tokens.shape == rollout.context.shape == (2 * group, codes.shape[1])
    assert torch.equal(rollout.real_codes, codes.repeat_interleave(group, dim=0))
    context = rollout.context.view(2, group, -1)
    assert all(torch.equal(context[:, 0], context[:, g]) for g in range(group))  # one context per image
    kept = context[:, 0] == codes
    assert 0.3 < kept.float().mean() < 0.8  # half replaced (a random code equals the real one 1 time in 256)
    assert not torch.equal(rollout.tokens.view(2, group, -1)[:, 0], rollout.tokens.view(2, group, -1)[:, 1])
    with torch.no_grad():
        emb, mask = backbone.encode_prompts(rollout.prompts)
        for policy, recorded in ((models.policy, rollout.logp_old), (models.reference, rollout.logp_ref)):
            log_probs = backbone.token_logits(policy, emb, mask, rollout.context).log_softmax(-1)
            expected = log_probs.gather(-1, rollout.tokens[..., None])[..., 0]
            torch.testing.assert_close(recorded, expected, rtol=1e-5, atol=1e-5)
        decoded = models.vq_ema.module.decode_codes(rollout.tokens)
        repeated = real.repeat_interleave(group, dim=0)
        mse = ((decoded - repeated) ** 2).flatten(1).mean(dim=1)
        perceptual = models.perceptual(repeated, decoded)
    torch.testing.assert_close(rollout.components["pixel_distance"], mse)
    torch.testing.assert_close(rollout.reward, -(2.0 * mse + 0.5 * perceptual))
    assert rollout.prompts == [prompt for prompt in prompts for _ in range(group)]


def test_pixel_rollout_without_noise_teacher_forces_the_real_codes(tmp_path):
    run_, _ = start_posttrain("toy", str(tmp_path), [*TINY, "mode=pixel", "pixel_context_noise=0"], resume=False)
    prompts, real_images = next_prompts(run_)
    rollout = collect_pixel_rollout(run_, prompts, real_images)
    assert torch.equal(rollout.context, rollout.real_codes)


@pytest.fixture(scope="module")
def pixel_and_decoder_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pixel_and_decoder")
    run(out, "mode=pixel_and_decoder", "steps=3", "disc_start=1", "save_every=3", "grid_every=3", *WEIGHTS)
    return out


def test_logged_policy_loss_is_surrogate_plus_kl_plus_likelihood(pixel_and_decoder_run):
    """L = surrogate + beta * Omega + lambda_lik * CE(z*), with the config's beta and lambda_lik;
    the regulariser is the real codes' cross-entropy, near log 256 for a policy guessing from a
    half-random context."""
    rows = records(pixel_and_decoder_run)
    for row in rows:
        expected = row["policy/surrogate"] + 0.05 * row["policy/kl"] + 0.3 * row["policy/likelihood"]
        assert row["policy/loss"] == pytest.approx(expected, rel=1e-5, abs=1e-9)
        assert 1.0 < row["policy/likelihood"] < 20.0
    assert rows[0]["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # rollout vs teacher forcing: one policy
    assert rows[-1]["policy/kl"] > 0.0
    assert all(row["decoder/loss"] is not None and row["disc/loss"] is not None for row in rows)
    assert rows[0]["reward"] == pytest.approx(
        -(2.0 * rows[0]["reward/pixel_distance_mean"] + 0.5 * rows[0]["reward/perceptual_distance_mean"]), rel=1e-5
    )


def test_pixel_mode_trains_the_policy_only_and_pixel_and_decoder_the_decoder_too(tmp_path, pixel_and_decoder_run):
    run(tmp_path / "pixel", "mode=pixel", "steps=2", "save_every=2", "grid_every=100")
    start_vq, start_policy = load_file(asset_path("tokenizer")), load_file(asset_path("policy"))

    def unchanged(start, end, names=None):
        return all(torch.equal(start[name].float(), end[name]) for name in (names or start))

    for stem in ("vq", "vq_ema"):
        assert unchanged(start_vq, checkpoint(tmp_path / "pixel", 2, stem))
    assert not unchanged(start_policy, checkpoint(tmp_path / "pixel", 2, "policy"))
    vq = checkpoint(pixel_and_decoder_run, 3, "vq")
    assert not unchanged(start_policy, checkpoint(pixel_and_decoder_run, 3, "policy"))
    assert not unchanged(start_vq, vq)
    # the token space never moves: the encoder, quant_conv and codebook are the start's
    fixed = [name for name in start_vq if name.startswith(("encoder.", "quant_conv.", "quantize."))]
    assert fixed and unchanged(start_vq, vq, fixed)


def test_nan_pixel_loss_skips_that_policy_step_only(tmp_path, monkeypatch, one_thread):
    """A NaN likelihood regulariser at step 2: the policy skips step 2, the decoder stage trains."""
    monkeypatch.setattr(
        posttrain, "with_likelihood_regulariser", nan_on_calls(posttrain.with_likelihood_regulariser, {2})
    )
    out = tmp_path / "run"
    train_posttrain("toy", str(out), [*TINY, "mode=pixel_and_decoder", "steps=3", "disc_start=0", "save_every=1",
                                      "grid_every=100", "policy_ema_every=1"])  # fmt: skip
    rows = strict_records(out)
    assert [row["skipped/policy"] for row in rows] == [0, 1, 1]
    assert rows[1]["policy/loss"] is None
    assert same(weights(out, 1, "policy"), weights(out, 2, "policy"))
    assert same(weights(out, 1, "policy_ema"), weights(out, 2, "policy_ema"))
    assert not same(weights(out, 2, "policy"), weights(out, 3, "policy"))
    assert not same(weights(out, 1, "vq"), weights(out, 2, "vq"))
    assert_all_finite(out)
