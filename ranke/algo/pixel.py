"""VA-π's pixel-space alignment of the policy (Liao et al., arXiv 2512.19680; METHOD.md section 7).

The tokenizer stays frozen. For a real image x with codes z* = Q(E(x)), the policy predicts every
token under teacher forcing on a corrupted copy of z* (`corrupted_context`); G predictions per
image are drawn from those distributions, decoded and rewarded by how well they reconstruct x
(`pixel_reconstruction_reward`); a group-relative policy loss (`ranke.algo.policy_losses`) follows,
plus the ELBO's prior term, the next-token cross-entropy of z* under the same context
(`likelihood_regulariser`, added by `with_likelihood_regulariser`).

Pure functions of tensors. Shapes: N sequences (B images x G predictions), L tokens.
"""

from __future__ import annotations

import torch

from ranke.algo.grpo import sequence_token_mean
from ranke.algo.vqgan import pixel_error


def corrupted_context(codes: torch.Tensor, replace: torch.Tensor, random_codes: torch.Tensor) -> torch.Tensor:
    """VA-π's noisy teacher forcing: z~_t = u_t where b_t, else z*_t.

    `codes` z* [.., L]; `replace` b [.., L] bools (VA-π: b_t ~ Bernoulli(p)); `random_codes` u
    [.., L] (VA-π: uniform over the codebook). The policy then predicts z_t from z~_<t.
    """
    return torch.where(replace, random_codes, codes)


def image_distance(prediction: torch.Tensor, real: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Per-image pixel distance [N] of images [N, C, H, W]: `l2` = 1/(CHW) sum (x_hat - x)^2
    (VA-π's default), `l1` = 1/(CHW) sum |x_hat - x|."""
    return pixel_error(real, prediction, kind).flatten(1).mean(dim=1)


def pixel_reconstruction_reward(
    pixel_distance: torch.Tensor,
    perceptual_distance: torch.Tensor,
    pixel_weight: float = 1.0,
    perceptual_weight: float = 1.0,
) -> torch.Tensor:
    """VA-π's intrinsic reward [N]: r_i = -(w_pix * d_pix(x_hat_i, x) + w_perc * d_perc(x_hat_i, x)),
    the negated reconstruction loss of decoded prediction x_hat_i (VA-π: MSE and LPIPS, both
    weights 1)."""
    return -(pixel_weight * pixel_distance + perceptual_weight * perceptual_distance)


def likelihood_regulariser(logp_real: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The ELBO's prior term as VA-π trains it: the next-token cross-entropy of the real codes,
    -1/N sum_i 1/|o_i| sum_t log pi(z*_t | z~_<t, y), from their log-probs `logp_real` [N, L]
    (under the same corrupted context as the predictions)."""
    return -sequence_token_mean(logp_real, mask)


def with_likelihood_regulariser(
    loss: torch.Tensor,
    stats: dict[str, torch.Tensor],
    logp_real: torch.Tensor,
    weight: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss + weight * `likelihood_regulariser` (VA-π's weight 0.1), with the regulariser added to
    `stats` as `likelihood`."""
    regulariser = likelihood_regulariser(logp_real, mask)
    return loss + weight * regulariser, {**stats, "likelihood": regulariser.detach()}
