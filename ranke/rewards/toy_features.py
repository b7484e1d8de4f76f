"""The toy world's "Inception": a feature network for Frechet distance, trained independently
of the reward.

FID needs a fixed network whose features respond both to content and to image quality. The
toy feature net is trained (by `ranke.train.judges.train_toy_features`) on a different objective
from the toy CLIP: predict a scene's attributes from its pixels (number of objects, which
colours, shapes, sizes and (shape, colour, size) objects are present, where the objects are on
a coarse grid, the background's texture kind, mean colour and contrast). Its pooled last layer
then encodes content and background texture. It is never used by any training loss.

The trunk starts with a full-resolution 3x3 conv (no patchify), so that pixel-level changes
(blur, noise, banding) reach the features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ranke.assets import load_asset
from ranke.rewards.base import normalize_pixels, resize_center_crop
from ranke.toy.scenes import BACKGROUNDS, COLORS, SHAPES, SIZES, Scene

ASSET_KIND = "toy_features"
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)
ATTRIBUTES = [*COLORS, *SHAPES, *SIZES]  # 12 distinct words
OBJECT_TYPES = [(shape, color, size) for shape in SHAPES for color in COLORS for size in SIZES]
LAYOUT_CELLS = 4  # object centres are located on a LAYOUT_CELLS x LAYOUT_CELLS grid
MAX_OBJECTS = 3


@dataclass
class ToyFeatureArgs:
    """Architecture of the toy feature network (stored in its asset file)."""

    width: int = 32  # channels at full resolution; conv stages have width x (1, 1, 2, 4, 4)
    feature_dim: int = 128  # D of the Frechet distance features: half spatial means, half maxima
    image_size: int = 64


@dataclass
class SceneTargets:
    """What the network learns to predict, for a batch of B scenes."""

    count: torch.Tensor  # [B] long, number of objects - 1
    attributes: torch.Tensor  # [B, 12] float 0/1, presence of each colour, shape and size
    objects: torch.Tensor  # [B, 48] float 0/1, presence of each (shape, colour, size)
    layout: torch.Tensor  # [B, 16] float 0/1, grid cells holding an object centre
    background: torch.Tensor  # [B] long, index of the background kind
    background_color: torch.Tensor  # [B, 6] float, mean RGB of its two colours and their |difference|


def scene_targets(scenes: list[Scene]) -> SceneTargets:
    """Training targets of a batch of scenes."""
    attributes = torch.zeros(len(scenes), len(ATTRIBUTES))
    objects = torch.zeros(len(scenes), len(OBJECT_TYPES))
    layout = torch.zeros(len(scenes), LAYOUT_CELLS * LAYOUT_CELLS)
    colors = torch.zeros(len(scenes), 6)
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            for value in (obj.spec.color, obj.spec.shape, obj.spec.size):
                attributes[row, ATTRIBUTES.index(value)] = 1.0
            objects[row, OBJECT_TYPES.index((obj.spec.shape, obj.spec.color, obj.spec.size))] = 1.0
            cell_x = min(int(obj.x * LAYOUT_CELLS), LAYOUT_CELLS - 1)
            cell_y = min(int(obj.y * LAYOUT_CELLS), LAYOUT_CELLS - 1)
            layout[row, cell_y * LAYOUT_CELLS + cell_x] = 1.0
        # Mean and |difference| are symmetric in the two colours: which one is "a" is not visible
        # (a linear gradient from a to b at angle t is the one from b to a at t + pi).
        color_a, color_b = torch.tensor(scene.background.color_a), torch.tensor(scene.background.color_b)
        colors[row] = torch.cat([(color_a + color_b) / 2, (color_a - color_b).abs()])
    return SceneTargets(
        count=torch.tensor([len(s.objects) - 1 for s in scenes]),
        attributes=attributes,
        objects=objects,
        layout=layout,
        background=torch.tensor([BACKGROUNDS.index(s.background.kind) for s in scenes]),
        background_color=colors,
    )


def _conv_block(channels_in: int, channels_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    )


class ToyFeatureNet(nn.Module):
    """Normalised pixels [B, 3, S, S] -> features [B, feature_dim] (`features`), or the heads'
    predictions (`forward`): count logits [B, 3], object logits [B, 48], layout logits [B, 16],
    background logits [B, 4], background colour [B, 6].

    The features are two poolings of the last conv map ([B, feature_dim / 2, h, w]): its spatial
    mean (like Inception's pool3: how much of each local pattern the image holds, so texture and
    detail everywhere, background included) and its spatial max (whether a pattern occurs at all:
    objects). The layout head reads the map itself (one logit per grid cell), the other heads
    read the features.
    """

    def __init__(self, args: ToyFeatureArgs):
        super().__init__()
        self.args = args
        widths = [args.width, args.width, 2 * args.width, 4 * args.width, 4 * args.width]
        layers = [_conv_block(3, widths[0], stride=1)]
        for channels_in, channels_out in zip(widths[:-1], widths[1:]):
            layers.append(_conv_block(channels_in, channels_out, stride=2))
        if args.feature_dim % 2:
            raise ValueError(f"feature_dim must be even (mean and max halves), got {args.feature_dim}")
        channels = args.feature_dim // 2
        layers += [nn.Conv2d(widths[-1], channels, 1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.trunk = nn.Sequential(*layers)
        self.count_head = nn.Linear(args.feature_dim, MAX_OBJECTS)
        self.attribute_head = nn.Linear(args.feature_dim, len(ATTRIBUTES))
        self.object_head = nn.Linear(args.feature_dim, len(OBJECT_TYPES))
        self.layout_head = nn.Conv2d(channels, 1, 1)
        self.background_head = nn.Linear(args.feature_dim, len(BACKGROUNDS))
        self.color_head = nn.Linear(args.feature_dim, 6)

    @staticmethod
    def pool(feature_map: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, 2C]: spatial means, then spatial maxima."""
        return torch.cat([feature_map.mean(dim=(2, 3)), feature_map.amax(dim=(2, 3))], dim=1)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pool(self.trunk(pixels))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        feature_map = self.trunk(pixels)
        features = self.pool(feature_map)
        cells = F.adaptive_avg_pool2d(feature_map, LAYOUT_CELLS)
        return {
            "count": self.count_head(features),
            "attributes": self.attribute_head(features),
            "objects": self.object_head(features),
            "layout": self.layout_head(cells).flatten(1),
            "background": self.background_head(features),
            "background_color": self.color_head(features),
        }


def to_network_input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images [N, 3, H, W] -> normalised float pixels at image_size."""
    pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return normalize_pixels(resize_center_crop(pixels, image_size), PIXEL_MEAN, PIXEL_STD)


class ToyFeatureExtractor:
    """`FeatureExtractor` of the toy world: images [N, 3, H, W] -> float64 features [N, feature_dim]."""

    def __init__(self, model: ToyFeatureNet, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        pixels = to_network_input(images.to(self.device), self.model.args.image_size)
        return self.model.features(pixels).double().cpu().numpy()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur float images [N, 3, H, W] with a Gaussian of std `sigma` pixels (kernel radius
    ceil(3 sigma), reflected borders); sigma 0 returns the images unchanged."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def add_noise(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Float images [N, 3, H, W] in [0, 1] plus i.i.d. Gaussian noise of std `sigma`, clipped to [0, 1]."""
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype, device=images.device)
    return (images + sigma * noise).clamp(0.0, 1.0)


def load_toy_features(path: str | Path, device: str | torch.device = "cpu") -> ToyFeatureExtractor:
    """The feature network of an asset file (kind "toy_features") as a FeatureExtractor."""
    args, state = load_asset(path, ASSET_KIND)
    model = ToyFeatureNet(ToyFeatureArgs(**args))
    model.load_state_dict(state)
    return ToyFeatureExtractor(model, device)
