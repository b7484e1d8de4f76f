"""What CLIP-like rewards share: differentiable preprocessing, caching (the reward protocol itself:
`ranke.rewards.protocol`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch
import torch.nn.functional as F

from ranke.rewards.protocol import check_batch


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (antialiased bicubic), then center-crop `size` x `size`.

    This is CLIP's evaluation transform written in torch so that gradients reach the pixels.
    Antialiased bicubic in torch reproduces PIL's bicubic filter on float images; the longer
    side and the crop offset are floored as in Hugging Face's CLIP processor (torchvision rounds
    the offset instead: a one-pixel difference, only for non-square inputs with odd margins).
    """
    height, width = images.shape[-2:]
    short, long = min(height, width), max(height, width)
    if short != size:
        resized_long = int(size * long / short)
        new_size = (size, resized_long) if height <= width else (resized_long, size)
        images = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False, antialias=True)
        height, width = new_size
    top = (height - size) // 2
    left = (width - size) // 2
    return images[..., top : top + size, left : left + size]


def normalize_pixels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel standardisation with the image model's mean and std."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


class DualEncoderReward(ABC):
    """Reward `scale * cos(image embedding, text embedding)` of a CLIP-like dual encoder.

    Subclasses load a model and implement `encode_text` (strings -> features) and
    `encode_pixels` (model-ready pixels -> features). This class owns what they share:
    the differentiable preprocessing, unit-normalisation, and a per-prompt cache of text
    embeddings (they do not depend on the images; the cache holds one vector per distinct
    prompt, a few tens of MB for 30k prompts).
    """

    differentiable = True

    def __init__(
        self,
        name: str,
        image_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        device: str | torch.device,
        scale: float,
    ):
        self.name = name
        self.image_size = image_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.device = torch.device(device)
        self.scale = scale
        self._text_cache: dict[str, torch.Tensor] = {}

    @abstractmethod
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Text features [B, D] (not necessarily unit norm)."""

    @abstractmethod
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image features [B, D] of preprocessed pixels [B, 3, S, S] (not necessarily unit norm)."""

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings [B, D], computed once per distinct prompt."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            embeddings = F.normalize(self.encode_text(missing).float(), dim=-1)
            self._text_cache.update(zip(missing, embeddings))
        return torch.stack([self._text_cache[p] for p in prompts])

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings [B, D] of images [B, 3, H, W] in [0, 1] (differentiable)."""
        pixels = resize_center_crop(images.to(self.device, torch.float32), self.image_size)
        pixels = normalize_pixels(pixels, self.image_mean, self.image_std)
        return F.normalize(self.encode_pixels(pixels).float(), dim=-1)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        return self.scale * (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=-1)
