"""PatchGAN discriminator (pix2pix / taming-transformers / LlamaGen style).

A stack of 4x4 convolutions: the first `n_layers` halve the resolution, then one stride-1
conv and a 1-channel stride-1 conv give a map of real/fake logits, one per overlapping
patch (70x70 pixel receptive field for `n_layers=3`). For a 64x64 input and `n_layers=3`
the map is 6x6; for 256x256 it is 30x30.

Normalisation is BatchNorm, as in the reference runs (the layers live in `main`, so the
state-dict keys match taming's and LlamaGen's `NLayerDiscriminator`). Under DDP each process
normalises with its own batch statistics and DDP broadcasts rank 0's running statistics;
convert with `nn.SyncBatchNorm.convert_sync_batchnorm` if global batch statistics are wanted
(CUDA only). Real and fake batches go through the network in separate calls, so each is
normalised with its own statistics, as in the reference implementation.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class PatchDiscriminator(nn.Module):
    """PatchGAN: images [B, C, H, W] in [-1, 1] -> logits [B, 1, h, w]."""

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        widths = [base_channels * min(2**i, 8) for i in range(n_layers + 1)]
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        for i in range(1, n_layers + 1):
            stride = 2 if i < n_layers else 1
            # No conv bias: BatchNorm's shift replaces it.
            layers += [
                nn.Conv2d(widths[i - 1], widths[i], kernel_size=4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(widths[i]),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(widths[-1], 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def _init_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02) and shift 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
