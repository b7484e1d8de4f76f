"""Pixels of a toy scene: smooth textured background plus anti-aliased flat objects.

The background is evaluated at pixel centres (it is smooth, stripes have a period of >= 10 px
at 64 px, so it needs no anti-aliasing). Objects are supersampled `supersample` x `supersample`
times per pixel inside their box and area-averaged into a coverage in [0, 1], which blends the
palette colour over the background. Everything is a deterministic function of the scene.
"""

from __future__ import annotations

import numpy as np

from ranke.toy.scenes import PALETTE_RGB, Background, PlacedObject, Scene


def _pixel_centres(size: int) -> np.ndarray:
    return (np.arange(size) + 0.5) / size


def _value_noise(cells: int, seed: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth value noise in [0, 1]: random values on a grid, smoothstep-interpolated."""
    grid = np.random.default_rng(seed).random((cells + 1, cells + 1))
    u, v = x * cells, y * cells
    col = np.minimum(np.floor(u).astype(int), cells - 1)
    row = np.minimum(np.floor(v).astype(int), cells - 1)
    fu, fv = u - col, v - row
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    top = grid[row, col] * (1 - fu) + grid[row, col + 1] * fu
    bottom = grid[row + 1, col] * (1 - fu) + grid[row + 1, col + 1] * fu
    return top * (1 - fv) + bottom * fv


def render_background(background: Background, size: int) -> np.ndarray:
    """The background texture as float32 [size, size, 3] in [0, 1]."""
    centres = _pixel_centres(size)
    x, y = np.meshgrid(centres, centres)
    cos, sin = np.cos(background.angle), np.sin(background.angle)
    if background.kind == "linear":
        # Project on the gradient direction and rescale so the blend spans the whole image.
        t = ((x - 0.5) * cos + (y - 0.5) * sin) / (abs(cos) + abs(sin)) + 0.5
    elif background.kind == "radial":
        distance = np.hypot(x - background.center[0], y - background.center[1])
        t = np.clip(distance / background.radius, 0.0, 1.0)
    elif background.kind == "noise":
        t = _value_noise(background.noise_cells, background.noise_seed, x, y)
    elif background.kind == "stripes":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (x * cos + y * sin) / background.period + background.phase)
    else:
        raise ValueError(f"unknown background kind {background.kind!r}")
    color_a = np.asarray(background.color_a)
    color_b = np.asarray(background.color_b)
    return (color_a * (1 - t[..., None]) + color_b * t[..., None]).astype(np.float32)


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Point-in-shape test for offsets from the box centre (y down); the box is 2r x 2r."""
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius
    if shape == "triangle":
        # Apex up at the top edge of the box, base along the bottom edge.
        return (dy <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def object_coverage(obj: PlacedObject, size: int, supersample: int = 4):
    """Fractional pixel coverage of an object inside its pixel box.

    Returns (row slice, column slice, coverage float32 [rows, cols]).
    """

    def pixel_span(centre: float) -> slice:
        first = int(np.floor((centre - obj.radius) * size))
        last = int(np.ceil((centre + obj.radius) * size))
        return slice(max(first, 0), min(last, size))

    rows, cols = pixel_span(obj.y), pixel_span(obj.x)
    sub_offsets = (np.arange(supersample) + 0.5) / supersample
    sample_y = ((np.arange(rows.start, rows.stop)[:, None] + sub_offsets).ravel()) / size
    sample_x = ((np.arange(cols.start, cols.stop)[:, None] + sub_offsets).ravel()) / size
    inside = _inside(obj.spec.shape, sample_x[None, :] - obj.x, sample_y[:, None] - obj.y, obj.radius)
    height, width = rows.stop - rows.start, cols.stop - cols.start
    coverage = inside.reshape(height, supersample, width, supersample).mean(axis=(1, 3))
    return rows, cols, coverage.astype(np.float32)


def render_scene_float(scene: Scene, size: int = 64, supersample: int = 4) -> np.ndarray:
    """The scene as float32 [size, size, 3] in [0, 1]."""
    image = render_background(scene.background, size)
    for obj in scene.objects:
        rows, cols, coverage = object_coverage(obj, size, supersample)
        color = np.asarray(PALETTE_RGB[obj.spec.color], dtype=np.float32)
        alpha = coverage[..., None]
        image[rows, cols] = image[rows, cols] * (1 - alpha) + color * alpha
    return image


def render_scene(scene: Scene, size: int = 64, supersample: int = 4) -> np.ndarray:
    """The scene as uint8 [size, size, 3]."""
    return np.round(render_scene_float(scene, size, supersample) * 255).astype(np.uint8)


def render_scenes(scenes, size: int = 64, supersample: int = 4) -> np.ndarray:
    """Many scenes as uint8 [n, size, size, 3]."""
    out = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = render_scene(scene, size, supersample)
    return out
