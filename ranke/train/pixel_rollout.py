"""The pixel modes' rollout: VA-π's teacher-forced predictions of the real images' codes, scored
by how well their decodes reconstruct the real images (METHOD.md section 7; the terms are
`ranke.algo.pixel`).

For B real images x with captions y (this process's share of the step's batch):

1. z* = Q(E(x)), the real codes (the encoder and codebook never train, in any mode);
2. the context z~: each code of z* replaced by a uniformly random code with probability
   `pixel_context_noise` (`corrupted_context`);
3. one teacher-forced pass of the online policy on z~ gives pi(. | z~_<t, y) at every position
   (conditional, temperature 1, no filtering: VA-π's setting); G predictions per image are drawn
   from it, position by position, independently;
4. each prediction is decoded by the EMA decoder and rewarded by -(w_pix d_pix + w_perc d_perc)
   against x, in the model's [-1, 1] range (`pixel_reconstruction_reward`).

Every random draw is made for the whole step's batch and this process keeps its rows (as
`ranke.sampling.draw_image_tokens` does), so the rollout does not depend on the number of processes.
"""

from __future__ import annotations

import torch

from ranke.algo.pixel import corrupted_context, image_distance, pixel_reconstruction_reward
from ranke.models.vq import to_model_range, to_unit_range
from ranke.parallel import whole_weights
from ranke.runtime import autocast
from ranke.sampling import chosen_logprobs, draw_tokens
from ranke.train.rollouts import Rollout


@torch.no_grad()
def collect_pixel_rollout(run, prompts: list[str], real_images: torch.Tensor) -> Rollout:
    """The module docstring's steps for `prompts` and their `real_images` [B, 3, H, W] in [0, 1];
    `run` is the recipe's `PosttrainRun`. Groups are the G predictions of one image."""
    backbone, models, pcfg, group = run.backbone, run.models, run.pcfg, run.pcfg.group_size
    real = to_model_range(real_images)
    text_emb, text_mask = backbone.encode_prompts(prompts)
    with autocast(backbone.device, run.precision.name):
        codes = models.vq.encode_codes(real).flatten(1)  # [B, N]
        context = noisy_context(run, codes)
        with whole_weights(models.policy):
            log_probs = backbone.token_logits(models.policy, text_emb, text_mask, context).float().log_softmax(dim=-1)
        with models.reference_policy() as reference:  # a LoRA adapter's: the policy with the adapter off
            ref_log_probs = backbone.token_logits(reference, text_emb, text_mask, context).float().log_softmax(dim=-1)
    predictions = draw_predictions(run, log_probs)  # [B, G, N]
    with autocast(backbone.device, run.precision.name):
        decoded = models.vq_ema.module.decode_codes(predictions.flatten(0, 1)).float()  # unclamped, as VA-π
    repeated_real = real.repeat_interleave(group, dim=0)
    distances = {
        "pixel_distance": image_distance(decoded, repeated_real, pcfg.pixel_distance),
        "perceptual_distance": models.perceptual(repeated_real, decoded).float(),
    }
    reward = pixel_reconstruction_reward(
        distances["pixel_distance"], distances["perceptual_distance"],
        pixel_weight=pcfg.pixel_weight, perceptual_weight=pcfg.pixel_perceptual_weight,
    )  # fmt: skip

    def per_prediction(values: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [B*G, ...], groups contiguous
        return values.repeat_interleave(group, dim=0)

    return Rollout(
        prompts=[prompt for prompt in prompts for _ in range(group)],
        text_emb=per_prediction(text_emb), text_mask=per_prediction(text_mask), tokens=predictions.flatten(0, 1),
        logp_old=grouped_logprobs(log_probs, predictions), logp_ref=grouped_logprobs(ref_log_probs, predictions),
        images=to_unit_range(decoded), reward=reward, components=distances,
        nonfinite={name: int((~values.isfinite()).sum()) for name, values in distances.items()},
        context=per_prediction(context), real_codes=per_prediction(codes),
    )  # fmt: skip


def this_process_rows(run, draw) -> torch.Tensor:
    """`draw(total)` made for all `total` images of the step on the rollout generator, this process's rows kept."""
    shard = run.shard
    return draw(shard.total, run.generators["rollout"])[shard.start : shard.end]


def noisy_context(run, codes: torch.Tensor) -> torch.Tensor:
    """The real codes [B, N] with each replaced by a uniformly random code with probability `pixel_context_noise`."""
    tokens, codebook_size = codes.shape[1], run.models.vq.args.codebook_size

    def uniforms(total, generator):
        return torch.rand(total, tokens, generator=generator, device=generator.device)

    def random_codes(total, generator):
        return torch.randint(codebook_size, (total, tokens), generator=generator, device=generator.device)

    replace = this_process_rows(run, uniforms).to(codes.device) < run.pcfg.pixel_context_noise
    return corrupted_context(codes, replace, this_process_rows(run, random_codes).to(codes.device))


def draw_predictions(run, log_probs: torch.Tensor) -> torch.Tensor:
    """G tokens [B, G, N] per position of the per-position distributions `log_probs` [B, N, V]
    (inverse-CDF draws, `ranke.sampling.draw_tokens`)."""
    batch, tokens, vocab = log_probs.shape
    group = run.pcfg.group_size

    def uniforms(total, generator):
        return torch.rand(total, tokens, group, generator=generator, device=generator.device)

    draws = this_process_rows(run, uniforms).to(log_probs.device)
    drawn = draw_tokens(log_probs.exp().reshape(batch * tokens, vocab), draws.reshape(batch * tokens, group))
    return drawn.reshape(batch, tokens, group).transpose(1, 2)


def grouped_logprobs(log_probs: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """Log-probs [B*G, N] of the predictions [B, G, N] under their image's distributions [B, N, V]."""
    group = predictions.shape[1]
    return chosen_logprobs(log_probs[:, None].expand(-1, group, -1, -1), predictions).flatten(0, 1)
