"""The discriminator step shared by the tokenizer recipe and post-training's decoder stage:
one hinge step (`ranke.algo.vqgan.hinge_discriminator_loss`) on real images against decodes of
their own codes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ranke.parallel import average_gradients
from ranke.runtime import autocast
from ranke.train.guard import gradient_norm
from ranke.algo.vqgan import hinge_discriminator_loss
from ranke.train.trainer_state import GuardedOptimizer


@dataclass(frozen=True)
class DiscriminatorStep:
    """What one discriminator step measured (zeros before the discriminator starts)."""

    loss: torch.Tensor  # the weighted hinge loss
    logits_real: torch.Tensor  # mean logit on the real images
    logits_fake: torch.Tensor  # mean logit on the reconstructions


def discriminator_step(
    disc: torch.nn.Module,
    optimizer: GuardedOptimizer,
    real: torch.Tensor,
    fake: torch.Tensor,
    step: int,
    accelerator,
    precision: str,
    started: bool = True,
    loss_weight: float = 1.0,
) -> DiscriminatorStep:
    """When `started` (`vqgan.adopt_weight` past `disc_start`): `loss_weight` x hinge loss of
    `disc` on `real` vs `fake` (detached), gradients averaged over processes, one optimizer step
    unless the loss or gradient norm is not finite. Forward passes under `precision`, logits in
    float32. The discriminator is left frozen, so the generator's step does not compute its
    gradients."""
    zero = torch.zeros((), device=real.device)
    loss, logits_real, logits_fake = zero, zero, zero
    if started:
        disc.requires_grad_(True)
        with autocast(real.device, precision):
            logits_real, logits_fake = disc(real).float(), disc(fake.detach()).float()
        loss = loss_weight * hinge_discriminator_loss(logits_real, logits_fake)
        optimizer.zero_grad()
        accelerator.backward(loss)
        average_gradients(disc.parameters(), accelerator)
        optimizer.step(step + 1, {"disc/loss": loss, "disc/grad_norm": gradient_norm(disc.parameters())})
    disc.requires_grad_(False)
    return DiscriminatorStep(loss=loss, logits_real=logits_real.mean(), logits_fake=logits_fake.mean())
