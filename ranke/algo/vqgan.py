"""VQGAN loss terms: reconstruction, hinge adversarial losses and the adaptive GAN weight.

Used by tokenizer training and by RankE's reconstruction anchor (METHOD.md section 3,
`L_recon`: L1 + LPIPS + adaptively weighted hinge generator loss). Pure functions, no I/O.
Perceptual distances live in `ranke.models.perceptual`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Pixel reconstruction loss, mean over all elements: `l1` = mean|x - x_hat|, `l2` = mean (x - x_hat)^2."""
    if kind == "l1":
        return F.l1_loss(x_hat, x)
    if kind == "l2":
        return F.mse_loss(x_hat, x)
    raise ValueError(f"unknown reconstruction loss '{kind}' (expected 'l1' or 'l2')")


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: 0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the generator: -mean D(fake)."""
    return -logits_fake.mean()


def adaptive_generator_weight(
    recon_loss: torch.Tensor, gen_loss: torch.Tensor, last_layer_weight: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN's balance between the reconstruction and adversarial terms.

    lambda = ||grad_w recon_loss|| / (||grad_w gen_loss|| + 1e-4), with w the decoder's last
    layer weight, clamped to [0, max_weight] and detached, so the adversarial gradient at the
    output layer has the same magnitude as the reconstruction gradient. Both losses must
    still have their graphs (they are kept for the later backward).
    """
    recon_grad = torch.autograd.grad(recon_loss, last_layer_weight, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(gen_loss, last_layer_weight, retain_graph=True)[0]
    weight = recon_grad.norm() / (gen_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def adopt_weight(step: int, start: int) -> float:
    """Delayed start of a loss term: 0.0 before step `start`, 1.0 from it on."""
    return 1.0 if step >= start else 0.0
