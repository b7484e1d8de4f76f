"""Policy stage of RankE: GRPO with a KL anchor (METHOD.md section 3, "Policy stage").

Pure functions of tensors. Shapes: B prompts, G rollouts per prompt, N = B * G sequences,
L image tokens per sequence. Log-probs are per token, of the sampled token.

Token aggregation: every per-token term is averaged over the tokens of each sequence, then
over sequences (the GRPO objective's 1/G sum_i 1/|o_i| sum_t). With fixed-length image
token sequences and no mask this equals the global token mean; the two only differ when a
mask gives sequences different numbers of valid tokens.
"""

from __future__ import annotations

from typing import Callable

import torch


def per_sequence_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the valid tokens of each sequence [N, L] -> [N]: 1/|o_i| sum_t v_it.

    A sequence whose mask is all zero gets 0 (its token count is clamped to 1).
    """
    if mask is None:
        return values.mean(dim=-1)
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp_min(1.0)


def sequence_token_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the valid tokens of each sequence [N, L], then mean over sequences -> scalar:
    1/N sum_i 1/|o_i| sum_t v_it. A sequence whose mask is all zero contributes 0.
    """
    return per_sequence_mean(values, mask).mean()


def grouped_rewards(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """`rewards` [B*G] (groups contiguous: rollouts of prompt b at b*G .. b*G+G-1) or [B, G] as a
    detached float32 [B, G]; ValueError when they do not split into groups of `group_size`."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.detach().float().reshape(-1, group_size)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    std_eps: float = 1e-4,
    clamp: float = 5.0,
    unbiased: bool = True,
) -> torch.Tensor:
    """METHOD.md "advantage per rollout": A_i = (r_i - mean_group) / std_group, clamped to [-clamp, clamp].

    `rewards` is [B*G] (groups contiguous: rollouts of prompt b at b*G .. b*G+G-1) or [B, G];
    the result has the same shape (float32, no gradient). A group whose std is below `std_eps` gets all-zero
    advantages (nothing to rank, and dividing by ~0 would explode).

    The std is the sample std (Bessel-corrected, `unbiased=True`), which is what torch's
    `Tensor.std` returns by default and hence what a PyTorch release most plausibly computes;
    `unbiased=False` gives the population std (numpy's default), whose advantages are larger
    by sqrt(G / (G - 1)) (about 1.07 for G = 8). A group of one rollout has no spread: zeros.
    """
    grouped = grouped_rewards(rewards, group_size)
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=grouped.dtype)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, correction=1 if unbiased else 0)
    spread = std >= std_eps
    advantages = torch.where(spread, (grouped - mean) / std.clamp_min(std_eps), torch.zeros_like(grouped))
    return advantages.clamp(-clamp, clamp).reshape(rewards.shape)


def clipped_terms(
    ratio: torch.Tensor, advantage: torch.Tensor, clip_eps: float, clip_eps_high: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) elementwise, and where the clip cuts
    the gradient (rho > 1 + eps_high with A > 0, or rho < 1 - eps_low with A < 0, strictly).

    eps_low = `clip_eps`; eps_high = `clip_eps_high`, or `clip_eps` when None (symmetric PPO clip).
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = ratio * advantage
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high) * advantage
    with torch.no_grad():
        cut = ((ratio > 1.0 + high) & (advantage > 0)) | ((ratio < 1.0 - clip_eps) & (advantage < 0))
    return torch.minimum(unclipped, clipped), cut


Aggregate = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def clipped_surrogate_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    mask: torch.Tensor | None = None,
    clip_eps_high: float | None = None,
    aggregate: Aggregate = sequence_token_mean,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """METHOD.md "clipped surrogate": -mean(min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)).

    `logp_new`, `logp_old`: [N, L] per-token log-probs (old = at rollout time, no grad);
    `advantages`: [N], one per sequence, broadcast over its tokens; rho = exp(new - old).
    `clip_eps_high` makes the clip range asymmetric (DAPO's clip-higher); `aggregate` reduces the
    [N, L] terms to a scalar (GRPO: `sequence_token_mean`; Dr. GRPO and DAPO have their own).
    Returns the loss and detached statistics: `clip_fraction`, the fraction of valid tokens
    whose gradient the clip cuts (`clipped_terms`), and `ratio_mean`, the mean of rho (1 on the
    first update after a rollout), both aggregated like the loss.
    """
    ratio = torch.exp(logp_new - logp_old.detach())
    advantage = advantages.detach().to(ratio.dtype).unsqueeze(-1)
    terms, cut = clipped_terms(ratio, advantage, clip_eps, clip_eps_high)
    loss = -aggregate(terms, mask)
    with torch.no_grad():
        stats = {"clip_fraction": aggregate(cut.to(ratio.dtype), mask), "ratio_mean": aggregate(ratio, mask)}
    return loss, stats


def kl_anchor_squared(
    logp_new: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """METHOD.md anchor Omega_theta as released: mean(0.5 * (logp_new - logp_ref)^2).

    This is the "k2" estimator of KL(pi_new || pi_ref) on tokens sampled from the policy.
    """
    return sequence_token_mean(0.5 * (logp_new - logp_ref.detach()) ** 2, mask)


def kl_anchor_k3(logp_new: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The "k3" KL estimator (GRPO paper) as an alternative anchor: mean(exp(d) - d - 1), d = ref - new.

    Non-negative per token and zero exactly where new == ref.
    """
    log_ratio = logp_ref.detach() - logp_new
    return sequence_token_mean(torch.exp(log_ratio) - log_ratio - 1.0, mask)


KL_ANCHORS: dict[str, Callable[..., torch.Tensor]] = {"squared": kl_anchor_squared, "k3": kl_anchor_k3}


def kl_anchor(kind: str) -> Callable[..., torch.Tensor]:
    """The KL anchor function named `kind`: "squared" (released RankE) or "k3"."""
    if kind not in KL_ANCHORS:
        raise ValueError(f"unknown KL anchor '{kind}'; choose one of {', '.join(KL_ANCHORS)}")
    return KL_ANCHORS[kind]


def with_kl_anchor(
    surrogate: torch.Tensor,
    stats: dict[str, torch.Tensor],
    logp_new: torch.Tensor,
    logp_ref: torch.Tensor | None,
    beta: float,
    kl_kind: str,
    mask: torch.Tensor | None,
    loss_name: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """surrogate + beta * Omega_theta (`kl_anchor(kl_kind)`), with `surrogate` and `kl` added to `stats`.

    `logp_ref` may be None only when beta == 0 (no anchor, no `kl` statistic); `loss_name` names
    the caller in that error.
    """
    stats = {"surrogate": surrogate.detach(), **stats}
    if logp_ref is None:
        if beta != 0:
            raise ValueError(f"{loss_name} needs logp_ref when beta != 0")
        return surrogate, stats
    anchor = kl_anchor(kl_kind)(logp_new, logp_ref, mask)
    stats["kl"] = anchor.detach()
    return surrogate + beta * anchor, stats


def grpo_policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor | None,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.05,
    kl_kind: str = "squared",
    mask: torch.Tensor | None = None,
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """METHOD.md policy-stage objective (Shao et al. 2024, as released by RankE):

        L = -1/N sum_i 1/|o_i| sum_t min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i) + beta * Omega_theta

    with rho_it = exp(logp_new - logp_old) and A_i from `group_advantages`. `clip_eps_high`
    (None: `clip_eps`) sets the upper bound alone. `logp_ref` may be None only when beta == 0
    (plain clipped GRPO without anchor). Returns the loss and detached statistics: `surrogate`,
    `kl` (absent without a reference), `clip_fraction`, `ratio_mean`.
    """
    surrogate, stats = clipped_surrogate_loss(logp_new, logp_old, advantages, clip_eps, mask, clip_eps_high)
    return with_kl_anchor(surrogate, stats, logp_new, logp_ref, beta, kl_kind, mask, "grpo_policy_loss")
