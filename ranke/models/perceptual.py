"""Perceptual distances behind one interface: `PerceptualLoss.forward(x, y) -> [B]`.

Images are in [-1, 1]; the result is one non-negative distance per sample, differentiable
with respect to both inputs; the distance modules have no trainable parameters.

* `LPIPS` (kind "lpips"): the VGG16 variant of Zhang et al. 2018, as used by VQGAN,
  LlamaGen and the RankE reference runs. The network is plain torch; its weights are read
  from two local files the user supplies (nothing is downloaded):
  - `vgg_path`: torchvision's VGG16 state dict (`features.<i>.weight/bias`; `classifier.*`
    keys, if present, are ignored), e.g. `vgg16-397923af.pth`;
  - `lin_path`: the LPIPS linear heads `lin<k>.model.1.weight` of shape [1, C_k, 1, 1], as
    in the lpips package's `weights/v0.1/vgg.pth` (the file VQGAN and LlamaGen ship).
* `PyramidDistance` (kind "pyramid"): the toy-world substitute, used when no VGG weights
  are available. LPIPS earns its place in VQGAN training because pixel L1/L2 losses are
  minimised by blurry averages, while a distance on local structure penalises lost edges
  and texture. Without pretrained features we keep that property with two fixed
  (weight-free) measures on a 3-level Gaussian pyramid G_0 = x,
  G_{s+1} = blur(G_s) subsampled by 2 (blur = 5-tap binomial [1, 4, 6, 4, 1] / 16):
  - band-pass L1: mean |B_s(x) - B_s(y)| with B_s = G_s - blur(G_s), the Laplacian
    (difference-of-Gaussians) band at scale s. It compares edges and fine texture only;
    flat colour is left to the pixel loss, so the two terms do not double count.
  - structural dissimilarity: 1 - SSIM(G_s(x), G_s(y)) (Wang et al. 2004: 7x7 Gaussian
    window with sigma 1.5, no padding, images mapped to [0, 1], C1 = 0.01^2, C2 = 0.03^2),
    which compares local contrast and correlation, so a blurred or noisy patch scores badly
    even when its mean colour is right.
  distance = mean over the 3 scales of (band-pass L1 + (1 - SSIM)), averaged over channels
  and positions. It is 0 iff x == y, symmetric, grows with blur strength, and is in [0, ~2]
  (LPIPS-like magnitudes, so the LPIPS weight of a recipe carries over). It is not a
  learned perceptual metric and is not comparable with LPIPS numbers. Inputs must be at
  least 28 pixels per side (the SSIM window must fit at the coarsest scale).
* `NoPerceptual` (kind "none"): zero distance, no cost.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ranke.models.load import compare_state_dict, layout_of, read_state_dict
from ranke.runtime import UserError


class PerceptualLoss(nn.Module):
    """Interface: `forward(x, y)` with images [B, C, H, W] in [-1, 1] -> distances [B].

    Always computed in float32, also inside a bf16 autocast region: the distances are small
    differences of normalised features and local statistics (SSIM's E[x^2] - E[x]^2), which
    bf16's 8-bit mantissa cannot resolve (the toy pyramid distance of two near-equal decodes came
    out 9x too large, and its gradient drove the decoder stage to NaN). Subclasses implement
    `distance`."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.distance(x.float(), y.float())

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class NoPerceptual(PerceptualLoss):
    """Zero distance (perceptual term switched off)."""

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0])


# VGG16 convolution widths up to relu5_3 ("M" = 2x2 max pool), in torchvision's `features` order.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 and their widths.
LPIPS_TAPS = (3, 8, 15, 22, 29)
LPIPS_TAP_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for spec in VGG16_LAYERS:
        if spec == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, spec, kernel_size=3, padding=1), nn.ReLU()]
            in_channels = spec
    return nn.Sequential(*layers)


def _read_exact(path: str | Path | None, expected: dict, what: str, ignore: tuple[str, ...] = ()) -> dict:
    """Read a weights file for LPIPS and require exactly the expected keys and shapes."""
    if path is None:
        raise UserError(
            f"perceptual 'lpips' needs {what} (a local file; nothing is downloaded); "
            "use perceptual=pyramid when no VGG weights are available"
        )
    state = read_state_dict(path)
    problems = compare_state_dict(expected, state, ignore)
    if problems:
        raise UserError(f"{what} '{path}' has the wrong layout: " + "; ".join(problems[:3]))
    return state


class LPIPS(PerceptualLoss):
    """LPIPS-VGG16 distance with user-supplied weights (see module docstring for the file layouts)."""

    def __init__(self, vgg_path: str | Path | None, lin_path: str | Path | None) -> None:
        super().__init__()
        # Input normalisation of the LPIPS VGG model (applied to [-1, 1] images).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_TAP_CHANNELS)

        vgg_layout = {f"features.{key}": shape for key, shape in layout_of(self.features).items()}
        vgg_state = _read_exact(vgg_path, vgg_layout, "VGG16 weights (vgg_path)", ignore=("classifier.*",))
        self.features.load_state_dict({key.removeprefix("features."): vgg_state[key] for key in vgg_layout})

        lin_layout = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(LPIPS_TAP_CHANNELS)}
        lin_state = _read_exact(lin_path, lin_layout, "LPIPS linear weights (lin_path)")
        with torch.no_grad():
            for k, lin in enumerate(self.lins):
                lin.weight.copy_(lin_state[f"lin{k}.model.1.weight"])

        self.requires_grad_(False)
        self.eval()

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        h = (torch.cat([x, y]) - self.shift) / self.scale
        distance = x.new_zeros(batch)
        lin_at_tap = dict(zip(LPIPS_TAPS, self.lins))
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in lin_at_tap:
                # Unit-normalise each position's feature vector, then a learned weighted squared distance.
                unit = h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                distance = distance + lin_at_tap[index]((unit[:batch] - unit[batch:]).pow(2)).mean(dim=(1, 2, 3))
        return distance


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    window = torch.exp(-coords.pow(2) / (2 * sigma**2))
    return window / window.sum()


def _separable_filter(images: torch.Tensor, taps: torch.Tensor, pad: bool) -> torch.Tensor:
    """Per-channel 2-D filtering with the outer product of a 1-D kernel (reflect padding or none)."""
    channels, size = images.shape[1], taps.numel()
    if pad:
        images = F.pad(images, (size // 2,) * 4, mode="reflect")
    horizontal = taps.view(1, 1, 1, size).expand(channels, 1, 1, size)
    vertical = taps.view(1, 1, size, 1).expand(channels, 1, size, 1)
    images = F.conv2d(images, horizontal, groups=channels)
    return F.conv2d(images, vertical, groups=channels)


def ssim(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per sample, [B], for images in [0, 1] (valid positions only, no padding)."""
    c1, c2 = 0.01**2, 0.03**2
    mu_x = _separable_filter(x, window, pad=False)
    mu_y = _separable_filter(y, window, pad=False)
    var_x = _separable_filter(x * x, window, pad=False) - mu_x.pow(2)
    var_y = _separable_filter(y * y, window, pad=False) - mu_y.pow(2)
    cov = _separable_filter(x * y, window, pad=False) - mu_x * mu_y
    similarity = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return similarity.mean(dim=(1, 2, 3))


class PyramidDistance(PerceptualLoss):
    """Weight-free multi-scale structural distance (band-pass L1 + 1 - SSIM); see module docstring."""

    def __init__(self, scales: int = 3) -> None:
        super().__init__()
        self.scales = scales
        self.register_buffer("binomial", torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16, persistent=False)
        self.register_buffer("window", _gaussian_window(7, 1.5), persistent=False)

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        min_side = self.window.numel() * 2 ** (self.scales - 1)
        if min(x.shape[-2:]) < min_side:
            raise ValueError(f"pyramid distance needs images of at least {min_side} pixels per side, got {x.shape}")
        x, y = (x + 1) / 2, (y + 1) / 2
        distance = x.new_zeros(x.shape[0])
        for scale in range(self.scales):
            blur_x = _separable_filter(x, self.binomial, pad=True)
            blur_y = _separable_filter(y, self.binomial, pad=True)
            band_l1 = ((x - blur_x) - (y - blur_y)).abs().mean(dim=(1, 2, 3))
            distance = distance + band_l1 + (1 - ssim(x, y, self.window))
            if scale < self.scales - 1:
                x, y = blur_x[..., ::2, ::2], blur_y[..., ::2, ::2]
        return distance / self.scales


PERCEPTUAL_KINDS = ("lpips", "pyramid", "none")


def build_perceptual(
    kind: str, vgg_path: str | Path | None = None, lin_path: str | Path | None = None
) -> PerceptualLoss:
    """Perceptual distance by name: "lpips" (needs vgg_path and lin_path), "pyramid" or "none"."""
    if kind == "lpips":
        return LPIPS(vgg_path, lin_path)
    if kind == "pyramid":
        return PyramidDistance()
    if kind == "none":
        return NoPerceptual()
    raise UserError(f"unknown perceptual distance '{kind}' (expected 'lpips', 'pyramid' or 'none')")
