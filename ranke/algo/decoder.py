"""Decoder stage of RankE (METHOD.md section 3, "Decoder stage"): rank selection and the loss
terms of the decoder update. Pure functions of tensors; networks come in as callables or as
their outputs.

Shapes: B prompts, G rollouts per prompt, k kept rollouts per prompt; "selected" tensors
have the k rank-selected rollouts of every prompt flattened to B*k in prompt-major order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def select_top_k(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """METHOD.md "Rank selection": indices [B, k] of each prompt's k best rollouts out of G.

    Ordered best first; ties keep the lower rollout index first (stable sort), so the
    selection is deterministic.
    """
    group_size = rewards.shape[-1]
    if not 1 <= k <= group_size:
        raise ValueError(f"top-k must be in [1, {group_size}], got {k}")
    order = torch.sort(rewards, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def rank_weights(top_rewards: torch.Tensor, tau: float, uniform: bool = False) -> torch.Tensor:
    """METHOD.md rank weights: w = softmax(r_topK / tau) per prompt, rescaled to mean 1.

    `top_rewards`: [B, k]. The softmax is taken over each prompt's k kept rollouts and then
    multiplied by k, so every prompt's weights average 1, and therefore so do all B*k weights
    together. k = 1 gives all ones (the released best-of-G runs); tau -> inf tends to
    uniform. `uniform=True` is the "uniform GAN" ablation: all ones. No gradient flows.
    """
    if uniform:
        return torch.ones_like(top_rewards, dtype=torch.float32)
    if tau <= 0:
        raise ValueError(f"rank temperature tau must be > 0, got {tau}")
    k = top_rewards.shape[-1]
    return torch.softmax(top_rewards.detach().float() / tau, dim=-1) * k


def cosine_tau(
    step: int, total_steps: int, tau_start: float = 4.0, tau_end: float = 1.0, anneal_ratio: float = 0.15
) -> float:
    """METHOD.md tau schedule: cosine from `tau_start` (step 0) to `tau_end` over the first
    `anneal_ratio * total_steps` steps, then constant `tau_end`."""
    anneal_steps = anneal_ratio * total_steps
    if step >= anneal_steps:
        return tau_end
    progress = step / anneal_steps
    return tau_end + (tau_start - tau_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def rank_gan_loss(disc_logits_fake: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """METHOD.md L_rankgan: -mean(w * Disc(D_phi(z_policy))).

    `disc_logits_fake`: [B, ...] discriminator logits (e.g. PatchGAN [B, 1, h, w]) on the
    decodes of the rank-selected policy tokens; each sample's logits are averaged over its
    patches, weighted by its rank weight `weights` [B], then averaged over the batch.
    """
    per_sample = disc_logits_fake.flatten(1).mean(dim=1)
    return -(weights.detach().to(per_sample.dtype) * per_sample).mean()


def decoder_consistency_loss(
    perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    decoded_online: torch.Tensor,
    decoded_ema: torch.Tensor,
) -> torch.Tensor:
    """METHOD.md L_consist: mean perceptual distance (LPIPS) between the online decoder's and
    the EMA decoder's decodes of the same policy tokens. The EMA side is a fixed target
    (detached), so only the online decoder is pulled; `perceptual(x, y)` returns one
    distance per sample [B] (any shape that averages to the batch mean)."""
    return perceptual(decoded_online, decoded_ema.detach()).mean()


def reward_backprop_loss(reward_values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """METHOD.md L_reward: -mean(w * R(D_phi(z_policy), y)) with a differentiable reward.

    `reward_values`: [B] rewards of the online decoder's decodes, with their graph;
    `weights`: [B] rank weights.
    """
    return -(weights.detach().to(reward_values.dtype) * reward_values).mean()


def optional_reward_backprop_loss(
    reward_values: torch.Tensor, weights: torch.Tensor, differentiable: bool = True
) -> torch.Tensor:
    """L_reward where it exists: `reward_backprop_loss`, or a zero scalar when the reward is
    not differentiable (METHOD.md: it "simply contributes no gradient") or its values carry
    no graph (computed under no_grad)."""
    if not differentiable or not reward_values.requires_grad:
        return torch.zeros((), device=reward_values.device, dtype=reward_values.dtype)
    return reward_backprop_loss(reward_values, weights)


def soft_codes(topk_logits: torch.Tensor, topk_indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """METHOD.md soft code: sum_k softmax(topk logits)_k * C[idx_k].

    `topk_logits`, `topk_indices`: [B, L, k] the rollout's top-k logits per token position and
    their code indices; `codebook`: [K, d]. Returns [B, L, d], a convex combination of codes
    (not re-normalised, even for an l2-normalised codebook). Gradients reach the logits and
    the codebook; the decoder stage passes detached logits and a frozen codebook.
    """
    probabilities = torch.softmax(topk_logits.float(), dim=-1).to(codebook.dtype)
    codes = codebook[topk_indices]  # [B, L, k, d]
    return (probabilities.unsqueeze(-1) * codes).sum(dim=-2)


def soft_token_consistency_loss(decoded_soft: torch.Tensor, decoded_hard: torch.Tensor) -> torch.Tensor:
    """METHOD.md L_soft: MSE between the decode of the soft codes and the stop-gradient decode
    of the hard (sampled) codes."""
    return F.mse_loss(decoded_soft, decoded_hard.detach())


CONSISTENCY_SCHEDULES = ("none", "linear", "cosine")


def consistency_weight(
    step: int,
    schedule: str = "none",
    start_step: int = 0,
    end_step: int = 0,
    start_value: float = 0.0,
    end_value: float = 10.0,
) -> float:
    """METHOD.md lambda_c, "optionally scheduled (linear or cosine ramp over steps)".

    "none": the constant `end_value` (the nominal lambda_c: 10 LlamaGen, 5 Janus).
    "linear" / "cosine": `start_value` up to `start_step`, a ramp to `end_value` at
    `end_step`, then `end_value`; the cosine ramp is start + (end - start) * (1 - cos(pi t)) / 2.
    A ramp needs start_step < end_step: an empty span would silently mean no ramp.
    """
    if schedule not in CONSISTENCY_SCHEDULES:
        raise ValueError(f"unknown consistency schedule '{schedule}'; choose one of {', '.join(CONSISTENCY_SCHEDULES)}")
    if schedule == "none":
        return end_value
    if not 0 <= start_step < end_step:
        raise ValueError(f"a {schedule} consistency ramp needs 0 <= start_step < end_step, got {start_step}, {end_step}")
    if step >= end_step:
        return end_value
    if step <= start_step:
        return start_value
    progress = (step - start_step) / (end_step - start_step)
    if schedule == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return start_value + (end_value - start_value) * progress


def reconstruction_anchor_loss(
    pixel_loss: torch.Tensor,
    perceptual_loss: torch.Tensor,
    generator_loss: torch.Tensor,
    generator_weight: torch.Tensor | float,
    perceptual_weight: float = 1.0,
    disc_weight: float = 0.5,
    disc_factor: float = 1.0,
) -> torch.Tensor:
    """METHOD.md L_recon: the VQGAN reconstruction of ground-truth codes, L1 + LPIPS +
    adaptively weighted hinge generator loss, composed from `ranke.algo.vqgan` pieces:

        nll = pixel_loss + perceptual_weight * perceptual_loss
        L_recon = nll + disc_weight * disc_factor * generator_weight * generator_loss

    with `pixel_loss` = vqgan.reconstruction_loss(x, D_phi(Q(E(x)))), `generator_loss` =
    vqgan.hinge_generator_loss(Disc(recon)), `generator_weight` =
    vqgan.adaptive_generator_weight(nll, generator_loss, last decoder layer), and
    `disc_factor` = vqgan.adopt_weight(step, disc_start) (0 before the discriminator starts). No codebook/commitment terms: the
    encoder and codebook are frozen in this stage.
    """
    nll = pixel_loss + perceptual_weight * perceptual_loss
    return nll + disc_weight * disc_factor * generator_weight * generator_loss


@dataclass(frozen=True)
class DecoderTerms:
    """The decoder step's loss terms (scalars), unweighted: METHOD.md "Decoder stage"."""

    recon_anchor: torch.Tensor  # L_recon, `reconstruction_anchor_loss` (its GAN part weighted inside)
    rank_gan: torch.Tensor  # L_rankgan, `rank_gan_loss`
    consistency: torch.Tensor  # L_consist, `decoder_consistency_loss`
    reward: torch.Tensor  # L_reward, `optional_reward_backprop_loss`
    soft: torch.Tensor  # L_soft, `soft_token_consistency_loss`


@dataclass(frozen=True)
class DecoderWeights:
    """The weights of the decoder objective at one step (defaults: the released LlamaGen values);
    the recipe passes the ones inside L_recon to `reconstruction_anchor_loss` from here too, so the
    GAN weights reach the objective by one path."""

    recon: float = 1.0  # on L_recon
    perceptual: float = 1.0  # inside L_recon, on its LPIPS term
    rank_gan: float = 1.0  # on L_rankgan, times the GAN weight and factor below
    disc_weight: float = 0.5  # the GAN weight lambda_d, here and inside L_recon (`reconstruction_anchor_loss`)
    disc_factor: float = 1.0  # `vqgan.adopt_weight`: 0 before the discriminator starts, then 1
    consistency: float = 10.0  # lambda_c at this step (`consistency_weight`)
    reward: float = 0.01  # on L_reward
    soft: float = 0.0  # on L_soft (off in the released runs)


def decoder_objective(terms: DecoderTerms, weights: DecoderWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """METHOD.md decoder objective, and its five weighted terms by name:

        L = w_recon L_recon + w_rankgan lambda_d f_disc L_rankgan + lambda_c L_consist
            + w_reward L_reward + w_soft L_soft

    summed in that order; the parts are the five weighted terms.
    """
    parts = {
        "recon_anchor": weights.recon * terms.recon_anchor,
        "rank_gan": weights.rank_gan * weights.disc_weight * weights.disc_factor * terms.rank_gan,
        "consistency": weights.consistency * terms.consistency,
        "reward": weights.reward * terms.reward,
        "soft": weights.soft * terms.soft,
    }
    total = parts["recon_anchor"] + parts["rank_gan"] + parts["consistency"] + parts["reward"] + parts["soft"]
    return total, parts
