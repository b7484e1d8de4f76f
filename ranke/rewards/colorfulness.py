"""Colorfulness as a reward: a differentiable image statistic with a direction that is not realism.

Hasler and Suesstrunk's colorfulness (2003), on pixels in [0, 1] with opponent channels
rg = R - G and yb = (R + G) / 2 - B, each over the pixels of one image:

    M = sqrt(var(rg) + var(yb)) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)

(the paper's sqrt(sigma_rg^2 + sigma_yb^2) + 0.3 sqrt(mu_rg^2 + mu_yb^2), population variances),
times 100, so that a grey image scores 0 and a pure red one 100 * 0.3 * sqrt(1.25) = 33.5.

Why it is here: the rewards post-training uses in the real world (CLIP, HPSv2, aesthetic
predictors) also score properties that real photographs do not have more of, such as vivid
colour and contrast, and that is what lets a policy drift away from the images its decoder was
trained on while its reward rises. The toy CLIP reward was trained on clean renders only, so it
has no such direction; adding this term gives the toy world one (the toy renders put saturated
objects on low-saturation backgrounds, so a more colourful image is a less realistic one). The
score does not read the prompt.
"""

from __future__ import annotations

import torch

from ranke.rewards.protocol import check_batch

SCALE = 100.0
MEAN_WEIGHT = 0.3  # Hasler and Suesstrunk's weight of the mean opponent colour
# keeps sqrt differentiable at a flat image (variance 0); 1e-12 moves M by at most 1e-4
EPS = 1e-12


def colorfulness(images: torch.Tensor) -> torch.Tensor:
    """Colorfulness [B] of images [B, 3, H, W] with pixels in [0, 1] (see the module docstring)."""
    red, green, blue = images.float().unbind(dim=1)
    rg = (red - green).flatten(1)
    yb = (0.5 * (red + green) - blue).flatten(1)
    spread = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False) + EPS)
    offset = torch.sqrt(rg.mean(dim=1).square() + yb.mean(dim=1).square() + EPS)
    return SCALE * (spread + MEAN_WEIGHT * offset)


class ColorfulnessReward:
    """Reward = `colorfulness(images)`; differentiable, prompt-blind."""

    differentiable = True

    def __init__(self, name: str = "colorfulness"):
        self.name = name

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        return colorfulness(images)
