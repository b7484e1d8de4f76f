"""Inception-v3 features for Frechet distance on real images, the clean-fid way ("clean" mode).

The paper reports FID with clean-fid: Inception-v3 pool3 features (2048-d) of the TorchScript
network `inception-2015-12-05.pt` (the TensorFlow FID Inception, as StyleGAN2-ADA ships it),
with clean-fid's resize in front of it. That resize works on each colour channel separately, in
float: uint8 [H, W] -> float32 PIL image (mode "F") -> PIL bicubic to 299 x 299 -> clip to
[0, 255], with no quantisation back to uint8. The network then sees values in [0, 255] and
standardises them itself as (x - 128) / 128 before its layers.

We call clean-fid's own resizer and feed the network the way clean-fid does. The weights are
never downloaded: they come from a path given by the caller, from $RANKE_INCEPTION_WEIGHTS, or
from clean-fid's download location (/tmp, or the working directory on Windows) when a previous
clean-fid run of this user left the file there. That location is shared by every user of the
machine, so the cached file is used only when this user owns it and nobody else can write it
(a network planted there by someone else is refused); TorchScript runs code, so this matters.

clean-fid is an optional dependency. Beside a CPU-only torch, install it without its
dependencies (`pip install --no-deps clean-fid requests`): its declared torchvision dependency
pulls a build that does not load next to such a torch, and the pieces used here do not need it.
"""

from __future__ import annotations

import os
import platform
import stat
import warnings
from pathlib import Path

import numpy as np
import torch

from ranke.runtime import UserError

WEIGHTS_NAME = "inception-2015-12-05.pt"
WEIGHTS_ENV = "RANKE_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
FEATURE_DIM = 2048
INSTALL_HINT = "pip install --no-deps clean-fid requests"


def clean_fid_cache_path() -> Path:
    """Where clean-fid's own download puts the Inception weights."""
    return Path("./" if platform.system() == "Windows" else "/tmp") / WEIGHTS_NAME


def only_this_user_can_write(path: Path) -> bool:
    """True when `path` belongs to this user and no group or other user may write it (always
    true where file ownership is not POSIX)."""
    if not hasattr(os, "getuid"):
        return True
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def resolve_inception_weights(path: str | Path | None = None) -> Path:
    """The weights file: `path`, else $RANKE_INCEPTION_WEIGHTS, else clean-fid's cache when this
    user's own (`only_this_user_can_write`); never a download."""
    if path is not None:
        candidate, source = Path(path), "--inception-weights"
    elif os.environ.get(WEIGHTS_ENV):
        candidate, source = Path(os.environ[WEIGHTS_ENV]), f"${WEIGHTS_ENV}"
    else:
        candidate, source = clean_fid_cache_path(), "clean-fid's cache"
    if not candidate.is_file():
        raise UserError(
            f"Inception weights not found at '{candidate}' ({source}); place clean-fid's {WEIGHTS_NAME} "
            f"there or pass --inception-weights PATH (nothing is downloaded)"
        )
    if source == "clean-fid's cache" and not only_this_user_can_write(candidate):
        raise UserError(
            f"'{candidate}' (clean-fid's cache, a shared folder) belongs to another user or is writable by others; "
            "it is not loaded: pass --inception-weights PATH to a copy you trust"
        )
    return candidate


def clean_resizer():
    """clean-fid's "clean" resizer: uint8 [H, W, 3] -> float32 [299, 299, 3] in [0, 255]."""
    try:
        from cleanfid.resize import build_resizer
    except ImportError:
        raise UserError(f"Inception features need clean-fid, which is not installed ({INSTALL_HINT})") from None
    return build_resizer("clean")


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """Images [N, 3, H, W] (uint8, or float in [0, 1]) -> uint8 [N, H, W, 3].

    Float images are rounded to uint8 first, so that images scored in memory get the features
    they would get after being written as PNG files and read back.
    """
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


class InceptionExtractor:
    """`FeatureExtractor` for real images: [N, 3, H, W] -> float64 pool3 features [N, 2048]."""

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        self.resize = clean_resizer()
        path = resolve_inception_weights(weights)
        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():  # the file is TorchScript; torch 2.13 flags jit.load as deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                network = torch.jit.load(str(path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as err:
            raise UserError(f"'{path}' is not a TorchScript Inception network ({str(err).splitlines()[0]})") from None
        if not hasattr(network, "layers"):
            raise UserError(f"'{path}' has no 'layers' module; expected clean-fid's {WEIGHTS_NAME}")
        self.layers = network.layers

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        resized = np.stack([self.resize(image) for image in to_uint8_hwc(images)])
        pixels = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device)
        features = self.layers((pixels - 128.0) / 128.0).reshape(len(pixels), FEATURE_DIM)
        return features.double().cpu().numpy()
