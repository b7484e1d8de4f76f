"""Image grids: a batch of images as one PNG (training previews, evaluation samples, reports)."""

from __future__ import annotations

import errno
import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ranke.runtime import disk_full


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """[N,3,H,W] floats in [0,1] -> uint8 HxWx3 grid with `nrow` images per row."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, _, h, w = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3), 255, dtype=np.uint8)
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top : top + h, left : left + w] = pixels[i]
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    """The grid as a PNG at `path`; on a full disk the partial file is removed and the error is one line."""
    encoded = io.BytesIO()
    Image.fromarray(image_grid(images, nrow=nrow)).save(encoded, format="PNG")
    try:
        Path(path).write_bytes(encoded.getvalue())
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        Path(path).unlink(missing_ok=True)
        raise disk_full(path, len(encoded.getvalue())) from None


def grid_tiles(grid: np.ndarray, count: int, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """The `count` images [count, h, w, 3] of a grid `image_grid(images, nrow, padding)` made."""
    ncol = min(nrow, count)
    nrows = math.ceil(count / ncol)
    h, w = (grid.shape[0] - padding) // nrows - padding, (grid.shape[1] - padding) // ncol - padding
    if (h + padding) * nrows + padding != grid.shape[0] or (w + padding) * ncol + padding != grid.shape[1]:
        raise ValueError(f"a {grid.shape[1]}x{grid.shape[0]} grid does not hold {count} images {nrow} per row")
    tiles = []
    for i in range(count):
        r, c = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        tiles.append(grid[top : top + h, left : left + w])
    return np.stack(tiles)
