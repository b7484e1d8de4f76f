"""VQGAN loss terms: reconstruction, hinge adversarial losses and the adaptive GAN weight.

Used by tokenizer training and by RankE's reconstruction anchor (METHOD.md section 3,
`L_recon`: L1 + LPIPS + adaptively weighted hinge generator loss). Pure functions, no I/O.
Perceptual distances live in `ranke.models.perceptual`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


RECONSTRUCTION_KINDS = ("l1", "l2")


def reconstruction_loss(
    x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l1", pixel_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Pixel reconstruction loss, mean over all elements: `l1` = mean|x - x_hat|, `l2` = mean (x - x_hat)^2.

    With `pixel_weight` (broadcastable to x, e.g. [B, 1, H, W]) each element's error is multiplied
    by its weight before the mean; all-ones weights give the plain loss.
    """
    error = pixel_error(x, x_hat, kind)
    return error.mean() if pixel_weight is None else (pixel_weight * error).mean()


def pixel_error(x: torch.Tensor, x_hat: torch.Tensor, kind: str) -> torch.Tensor:
    """Elementwise reconstruction error: `l1` = |x - x_hat|, `l2` = (x - x_hat)^2."""
    if kind == "l1":
        return (x_hat - x).abs()
    if kind == "l2":
        return (x_hat - x) ** 2
    raise ValueError(f"unknown reconstruction loss '{kind}' (expected 'l1' or 'l2')")


def object_pixel_weight(
    x: torch.Tensor, object_weight: float, chroma_threshold: float = 0.3, margin: int = 2
) -> torch.Tensor:
    """Per-pixel reconstruction weights [B, 1, H, W] that favour the toy world's objects.

    x: images [B, 3, H, W] in the model's [-1, 1] range. A pixel is an object pixel when its
    chroma (max - min of RGB on the [0, 1] scale) is >= `chroma_threshold`, the verifier's own
    rule (toy objects 0.58-0.77, backgrounds <= 0.17); the mask is then grown by `margin` pixels
    (a max filter), because shapes differ mostly just outside the smaller one: a diamond is a
    circle of the same box minus four lunes up to 1.8 px thick on a small object, and those are
    background pixels. weight = 1 + object_weight * mask. A toy-recipe choice (`tokenizer.object_weight`):
    a plain pixel loss spends its capacity on the large smooth backgrounds, so small shapes blur
    into blobs that the verifier reads as circles.
    """
    unit = (x.detach() + 1.0) / 2.0
    chroma = unit.amax(dim=1, keepdim=True) - unit.amin(dim=1, keepdim=True)
    mask = (chroma >= chroma_threshold).float()
    if margin > 0:
        mask = F.max_pool2d(mask, kernel_size=2 * margin + 1, stride=1, padding=margin)
    return 1.0 + object_weight * mask


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
