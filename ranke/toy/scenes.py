"""Scenes of the toy shapes world: what is in an image, before any pixel is drawn.

A scene holds 1-3 flat, saturated objects (shape, colour, size, position) on a smooth,
low-saturation textured background. Geometry is in normalised image units: x to the right and
y downwards, both in [0, 1]; an object's `radius` is the half side of its bounding box, so every
shape of the same radius has the same box and "small"/"large" mean the same box sizes for all.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = ("red", "yellow", "green", "cyan", "blue", "purple")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUNDS = ("linear", "radial", "noise", "stripes")

# Palette hues are ~55-70 degrees apart so that decoding noise and VQ colour shifts of up to
# ~25 degrees still land on the right name. Values are (hue in degrees, HSV saturation, value).
PALETTE_HSV = {
    "red": (0.0, 0.82, 0.88),
    "yellow": (55.0, 0.85, 0.90),
    "green": (120.0, 0.78, 0.75),
    "cyan": (183.0, 0.82, 0.85),
    "blue": (235.0, 0.78, 0.88),
    "purple": (290.0, 0.72, 0.85),
}
PALETTE_RGB = {
    name: colorsys.hsv_to_rgb(hue / 360.0, sat, val) for name, (hue, sat, val) in PALETTE_HSV.items()
}

# Half side of the bounding box, as a fraction of the image side. The two ranges are far apart
# (box side <= 0.22 vs >= 0.32) so size survives blur and resizing; small objects still span
# >= 11 px at 64 px so their shape survives blur (and an 8x8-token VQ has a chance to keep it).
SIZE_RADIUS = {"small": (0.09, 0.11), "large": (0.16, 0.20)}

BORDER_MARGIN = 0.03  # empty space between any object box and the image border
OBJECT_GAP = 0.06  # minimum empty space between two object boxes (about 4 px at 64 px)
RELATION_MIN_OFFSET = 0.25  # centre offset along the relation's axis, for two-object scenes
RELATION_MAX_CROSS = 0.5  # |offset on the other axis| <= this fraction of the main offset

# Background colours: HSV saturation and value ranges. Chroma (max - min of RGB) stays below
# 0.2 * 0.85 = 0.17, far under the object palette's 0.58-0.77, so objects separate by colour.
BACKGROUND_MAX_SATURATION = 0.2
BACKGROUND_VALUE = (0.35, 0.85)

_PLACEMENT_BATCH = 256  # candidate layouts drawn at once by the vectorised rejection sampler


@dataclass(frozen=True)
class ObjectSpec:
    """What an object is, as a caption says it."""

    shape: str
    color: str
    size: str


@dataclass(frozen=True)
class PlacedObject:
    """An object in a scene: its spec, the centre of its box (x, y in [0, 1]) and its half side."""

    spec: ObjectSpec
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Background:
    """A smooth texture blending two low-saturation colours, `color_a` -> `color_b`.

    kind "linear": gradient along direction `angle` (radians);
    "radial": gradient from `center` outwards, reaching `color_b` at distance `radius`;
    "noise": value noise on a `noise_cells` x `noise_cells` grid drawn from `noise_seed`;
    "stripes": sinusoidal stripes varying along `angle` with `period` (image fraction) and `phase`.
    """

    kind: str
    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float]
    angle: float = 0.0
    center: tuple[float, float] = (0.5, 0.5)
    radius: float = 1.0
    period: float = 0.25
    phase: float = 0.0
    noise_cells: int = 4
    noise_seed: int = 0


@dataclass(frozen=True)
class Scene:
    """Objects on a background. Two-object scenes carry `relation` = (i, name, j): object i is
    `name` object j (sampled scenes use i=0, j=1)."""

    objects: tuple[PlacedObject, ...]
    background: Background
    relation: tuple[int, str, int] | None = None


def sample_background(rng: np.random.Generator) -> Background:
    """A random low-saturation textured background."""
    kind = str(rng.choice(BACKGROUNDS))
    hue = rng.random()
    value_a = rng.uniform(*BACKGROUND_VALUE)
    # The second colour differs clearly in brightness so the texture is visible.
    value_b = value_a + rng.choice([-1.0, 1.0]) * rng.uniform(0.08, 0.3)
    value_b = float(np.clip(value_b, *BACKGROUND_VALUE))
    hue_b = (hue + rng.uniform(-0.1, 0.1)) % 1.0
    color_a = colorsys.hsv_to_rgb(hue, rng.uniform(0.0, BACKGROUND_MAX_SATURATION), value_a)
    color_b = colorsys.hsv_to_rgb(hue_b, rng.uniform(0.0, BACKGROUND_MAX_SATURATION), value_b)
    return Background(
        kind=kind,
        color_a=tuple(float(c) for c in color_a),
        color_b=tuple(float(c) for c in color_b),
        angle=float(rng.uniform(0.0, 2 * np.pi)),
        center=(float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8))),
        radius=float(rng.uniform(0.5, 1.0)),
        period=float(rng.uniform(0.2, 0.35)),
        phase=float(rng.uniform(0.0, 2 * np.pi)),
        noise_cells=int(rng.integers(3, 6)),
        noise_seed=int(rng.integers(2**31)),
    )


def relation_satisfied(dx: np.ndarray, dy: np.ndarray, relation: str, min_offset: float, max_cross: float):
    """Whether object A relates to object B, given B's centre minus A's centre (dx, dy).

    "A left of B" means B lies to the right: dx >= min_offset and |dy| <= max_cross * dx.
    Works elementwise on arrays; the verifier uses it with looser numbers than the sampler.
    """
    along, across = {
        "left of": (dx, dy),
        "right of": (-dx, dy),
        "above": (dy, dx),
        "below": (-dy, dx),
    }[relation]
    return (along >= min_offset) & (np.abs(across) <= max_cross * along)


def _place(radii: np.ndarray, relation: str | None, rng: np.random.Generator) -> np.ndarray:
    """Centres [n, 2] for boxes of half side `radii`: inside the border, pairwise apart, and
    (for two objects) satisfying `relation` with a clear margin. Vectorised rejection sampling."""
    low = radii + BORDER_MARGIN
    high = 1.0 - radii - BORDER_MARGIN
    while True:
        centres = rng.uniform(low[None, :, None], high[None, :, None], size=(_PLACEMENT_BATCH, len(radii), 2))
        valid = np.ones(_PLACEMENT_BATCH, dtype=bool)
        for i in range(len(radii)):
            for j in range(i + 1, len(radii)):
                offset = np.abs(centres[:, i] - centres[:, j])
                apart = (offset >= radii[i] + radii[j] + OBJECT_GAP).any(axis=1)
                valid &= apart
        if relation is not None:
            delta = centres[:, 1] - centres[:, 0]
            valid &= relation_satisfied(delta[:, 0], delta[:, 1], relation, RELATION_MIN_OFFSET, RELATION_MAX_CROSS)
        hits = np.flatnonzero(valid)
        if hits.size:
            return centres[hits[0]]


def scene_from_spec(
    objects: list[ObjectSpec] | tuple[ObjectSpec, ...],
    relation: tuple[int, str, int] | None,
    rng: np.random.Generator,
) -> Scene:
    """A random scene realising the given objects (and relation between two of them)."""
    if not 1 <= len(objects) <= 3:
        raise ValueError(f"a scene holds 1 to 3 objects, got {len(objects)}")
    if relation is not None:
        if len(objects) != 2 or sorted((relation[0], relation[2])) != [0, 1]:
            raise ValueError(f"a relation links the two objects of a two-object scene, got {relation}")
        # Place so that object 0 relates to object 1; swap the pair first if the relation reads 1 -> 0.
        if relation[0] == 1:
            objects = (objects[1], objects[0])
    radii = np.array([rng.uniform(*SIZE_RADIUS[spec.size]) for spec in objects])
    centres = _place(radii, relation[1] if relation else None, rng)
    placed = [PlacedObject(spec, float(cx), float(cy), float(r)) for spec, (cx, cy), r in zip(objects, centres, radii)]
    if relation is not None and relation[0] == 1:
        placed.reverse()
    background = sample_background(rng)
    return Scene(tuple(placed), background, relation)


def sample_objects(rng: np.random.Generator) -> tuple[list[ObjectSpec], tuple[int, str, int] | None]:
    """1-3 random object specs with distinct (shape, colour) pairs, and a relation for two."""
    count = int(rng.integers(1, 4))
    specs: list[ObjectSpec] = []
    while len(specs) < count:
        spec = ObjectSpec(str(rng.choice(SHAPES)), str(rng.choice(COLORS)), str(rng.choice(SIZES)))
        if all((spec.shape, spec.color) != (s.shape, s.color) for s in specs):
            specs.append(spec)
    relation = (0, str(rng.choice(RELATIONS)), 1) if count == 2 else None
    return specs, relation


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene of the training distribution (uniform 1-3 objects)."""
    specs, relation = sample_objects(rng)
    return scene_from_spec(specs, relation, rng)
