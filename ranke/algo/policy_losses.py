"""The policy losses beside the release's GRPO (METHOD.md section 7) and their choice by name
(`posttrain.loss_type`): Dr. GRPO, DAPO, GSPO.

Pure functions of tensors, shapes as in `ranke.algo.grpo`: N sequences of L tokens, per-token
log-probs [N, L], one advantage per sequence [N], an optional token mask [N, L]. Each loss returns
(loss, detached statistics) with the statistics of `grpo_policy_loss`: `surrogate`, `kl` (with a
reference), `clip_fraction`, `ratio_mean`. The KL anchor (`kl_anchor`, weight beta) is the same
for all of them; the papers of Dr. GRPO, DAPO and GSPO train without it (beta = 0).
"""

from __future__ import annotations

from typing import Callable

import torch

from ranke.algo.grpo import (
    clipped_surrogate_loss,
    clipped_terms,
    group_advantages,
    grouped_rewards,
    grpo_policy_loss,
    per_sequence_mean,
    with_kl_anchor,
)


def group_centred_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO's advantage: A_i = r_i - mean_group (no division by the group std, no clamp).

    `rewards` [B*G] (groups contiguous) or [B, G]; the result has the same shape, float32, no
    gradient. A group whose rewards are all equal gets zeros.
    """
    grouped = grouped_rewards(rewards, group_size)
    return (grouped - grouped.mean(dim=1, keepdim=True)).reshape(rewards.shape)


def spread_groups(rewards: torch.Tensor, group_size: int, std_eps: float = 1e-4) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: [B] bools, True for the groups whose rewards differ
    (sample std >= `std_eps`, the bound below which `group_advantages` gives zeros). The other
    groups have zero advantage and carry no policy gradient."""
    return grouped_rewards(rewards, group_size).std(dim=1) >= std_eps


def fixed_length_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dr. GRPO's aggregation: 1/N sum_i (1/L sum_t m_it v_it), the token sum of each sequence
    divided by the constant L (the token dimension, the longest completion), not by |o_i|."""
    masked = values if mask is None else values * mask.to(values.dtype)
    return masked.sum(dim=-1).mean() / values.shape[-1]


def batch_token_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """DAPO's token-level aggregation: sum_{i,t} m_it v_it / sum_{i,t} m_it, every valid token of
    the batch weighted alike (a batch with no valid token gives 0)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def dr_grpo_policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor | None,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.0,
    kl_kind: str = "squared",
    mask: torch.Tensor | None = None,
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"):

        L = -1/N sum_i 1/L sum_t min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i) + beta * Omega_theta

    with A_i = r_i - mean_group (`group_centred_advantages`) and the constant L
    (`fixed_length_mean`) in place of each sequence's length |o_i|.
    """
    surrogate, stats = clipped_surrogate_loss(
        logp_new, logp_old, advantages, clip_eps, mask, clip_eps_high, aggregate=fixed_length_mean
    )
    return with_kl_anchor(surrogate, stats, logp_new, logp_ref, beta, kl_kind, mask, "dr_grpo_policy_loss")


def dapo_policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor | None,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.0,
    kl_kind: str = "squared",
    mask: torch.Tensor | None = None,
    clip_eps_high: float | None = 0.28,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAPO (Yu et al. 2025), clip-higher with token-level aggregation:

        L = -1 / sum_i |o_i| * sum_i sum_t min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)
            + beta * Omega_theta

    eps_low = `clip_eps` (0.2), eps_high = `clip_eps_high` (0.28); A_i the group-normalised
    advantage. Dynamic sampling (`spread_groups`) happens before, in the rollout.
    """
    surrogate, stats = clipped_surrogate_loss(
        logp_new, logp_old, advantages, clip_eps, mask, clip_eps_high, aggregate=batch_token_mean
    )
    return with_kl_anchor(surrogate, stats, logp_new, logp_ref, beta, kl_kind, mask, "dapo_policy_loss")


def sequence_ratio(logp_new: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """GSPO's importance ratio [N]: s_i = (pi_new(o_i) / pi_old(o_i))^(1/|o_i|)
    = exp(1/|o_i| sum_t (logp_new_it - logp_old_it)), the length-normalised sequence likelihood ratio."""
    return torch.exp(per_sequence_mean(logp_new - logp_old.detach(), mask))


def gspo_policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor | None,
    advantages: torch.Tensor,
    clip_eps: float = 3e-4,
    beta: float = 0.0,
    kl_kind: str = "squared",
    mask: torch.Tensor | None = None,
    clip_eps_high: float | None = 4e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025), one ratio and one clip per sequence:

        L = -1/N sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i) + beta * Omega_theta

    s_i from `sequence_ratio`; the paper's range eps_low 3e-4, eps_high 4e-4; A_i group-normalised.
    `clip_fraction` and `ratio_mean` are over sequences.
    """
    ratio = sequence_ratio(logp_new, logp_old, mask)
    terms, cut = clipped_terms(ratio, advantages.detach().to(ratio.dtype), clip_eps, clip_eps_high)
    surrogate = -terms.mean()
    stats = {"clip_fraction": cut.to(ratio.dtype).mean(), "ratio_mean": ratio.detach().mean()}
    return with_kl_anchor(surrogate, stats, logp_new, logp_ref, beta, kl_kind, mask, "gspo_policy_loss")


POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {
    "grpo": grpo_policy_loss,
    "dr_grpo": dr_grpo_policy_loss,
    "dapo": dapo_policy_loss,
    "gspo": gspo_policy_loss,
}


def _checked(loss_type: str) -> str:
    if loss_type not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss '{loss_type}'; choose one of {', '.join(POLICY_LOSSES)}")
    return loss_type


def policy_advantages(loss_type: str, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """The advantages of policy loss `loss_type`: r - mean_group for dr_grpo, else the clamped
    z-score within the group (`group_advantages`)."""
    if _checked(loss_type) == "dr_grpo":
        return group_centred_advantages(rewards, group_size)
    return group_advantages(rewards, group_size)


def policy_loss(
    loss_type: str,
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor | None,
    advantages: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float,
    beta: float,
    kl_kind: str = "squared",
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss named `loss_type` (`POLICY_LOSSES`: grpo, dr_grpo, dapo, gspo) with the clip
    range [1 - clip_eps, 1 + clip_eps_high], anchor weight `beta` and anchor `kl_kind`."""
    return POLICY_LOSSES[_checked(loss_type)](
        logp_new, logp_old, logp_ref, advantages, clip_eps, beta, kl_kind, mask, clip_eps_high
    )
