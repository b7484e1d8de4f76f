"""The toy world's GenEval: read objects back from pixels and check them against a caption.

Detection (thresholds are fractions of the image, so any resolution works):
1. pixels with chroma (max - min of RGB in [0, 1]) >= CHROMA_THRESHOLD are object pixels:
   backgrounds have chroma <= 0.17, the palette 0.58-0.77, so the threshold sits near half
   coverage of an anti-aliased edge; 8-connected components of them are candidate objects and
   those under MIN_AREA of the image are noise (objects that touch merge into one component,
   which then reads as a wrong or "unknown" shape: generated scenes keep objects apart);
2. each component's coverage is estimated per pixel by alpha matting between the local
   background colour and the object's own colour (both medians read from the image), which
   makes the measurements below insensitive to blurred edges and colour shifts;
3. colour: the palette hue nearest to the object's median colour;
4. shape from coverage moments: a triangle (apex up) is skewed, its mass sits low (vertical
   skewness ~ -0.57, every other shape 0); among the symmetric shapes, a square's mass spreads
   along its diagonals, a diamond's along the axes, a circle's equally: the kurtosis along the
   diagonals minus along the axes is +0.6 / -0.6 / 0. A circle stays at 0 under any isotropic
   blur, and blur only scales the other values down, so the thresholds are far from the data.
   Elongated, lopsided or non-compact components are "unknown";
5. size from the box side implied by the area and the shape (area = fill * side^2, fill = 1,
   pi/4, 1/2, 1/2; area is unchanged by blur): scenes have small sides <= 0.22 of the image and
   large ones >= 0.32, the cut is at LARGE_MIN_SIDE; position = box centre (the centre of mass,
   moved up by side/6 for a triangle).

Scoring: caption objects are matched one-to-one to detections of equal colour, shape and size
(the assignment that matches most objects, then satisfies the relation). A relation "A left of B"
holds when B's centre is at least RELATION_MIN_OFFSET to the right of A's and the horizontal
offset dominates the vertical one (likewise for the other relations). A prompt is correct when
every object is matched, the relation (if any) holds, and there is no other detected object:
toy captions describe the whole scene, so an extra object is an error.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ranke.toy.captions import CaptionSpec, parse_caption
from ranke.toy.scenes import PALETTE_HSV, relation_satisfied

CHROMA_THRESHOLD = 0.3
MIN_AREA = 0.0025  # 10 px at 64 px; the smallest object covers ~66 px
MIN_COVERAGE = 0.15  # estimated coverage under this is treated as noise
TRIANGLE_MAX_SKEW = -0.25  # vertical skewness: triangle -0.57, the other shapes 0
MAX_SKEW = 0.25  # any other skewness (left-right, or mass high up) is not one of our shapes
SQUARENESS = 0.2  # diagonal minus axial kurtosis: square +0.6, circle 0, diamond -0.6
MAX_ASPECT = 1.5  # ratio of the standard deviations along the axes or the diagonals
MIN_COMPACTNESS = 4.0  # area / (var_x + var_y): circle 6.3, square and diamond 6, triangle 5.1
LARGE_MIN_SIDE = 0.27  # box side as a fraction of the image side
RELATION_MIN_OFFSET = 0.1
RELATION_MAX_CROSS = 1.0  # the offset along the relation's axis must dominate the other one

# Shape area over box area; an unknown blob is sized like a circle.
IDEAL_FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5, "diamond": 0.5, "unknown": np.pi / 4}
_PALETTE_NAMES = tuple(PALETTE_HSV)
_PALETTE_HUES = np.array([hue for hue, _, _ in PALETTE_HSV.values()])
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_CROP_PAD = 5  # room around a component for its background ring


@dataclass(frozen=True)
class Detection:
    """An object read from pixels; box centre (x, y), box side and area in image fractions."""

    color: str
    shape: str
    size: str
    x: float
    y: float
    side: float
    area: float


@dataclass
class VerifierResult:
    """Outcome of checking one image against one caption.

    object_correct[i]: caption object i was matched; relation_correct: None without a relation;
    extra: detections left unmatched; correct: the whole prompt is right.
    """

    spec: CaptionSpec
    detections: list[Detection]
    object_correct: list[bool]
    relation_correct: bool | None
    extra: int
    correct: bool = field(init=False)

    def __post_init__(self):
        self.correct = all(self.object_correct) and self.relation_correct is not False and self.extra == 0

    @property
    def object_accuracy(self) -> float:
        return sum(self.object_correct) / len(self.object_correct)


def as_float_image(image) -> np.ndarray:
    """HxWx3 float64 in [0, 1] from uint8 or float HxWx3 (or 3xHxW) arrays and tensors."""
    array = np.asarray(image)
    if array.ndim != 3:
        raise ValueError(f"expected one image of shape HxWx3, got shape {array.shape}")
    if array.shape[0] == 3 and array.shape[2] != 3:
        array = array.transpose(1, 2, 0)
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees of RGB values [..., 3] (0 for greys)."""
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = high - low
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(chroma > 0, chroma, 1.0)
    sector = np.where(
        high == red,
        ((green - blue) / safe) % 6,
        np.where(high == green, (blue - red) / safe + 2, (red - green) / safe + 4),
    )
    return sector * 60.0


def nearest_color(rgb: np.ndarray) -> str:
    """Palette colour name of nearest hue."""
    distance = np.abs(hue_degrees(rgb) - _PALETTE_HUES)
    return _PALETTE_NAMES[int(np.minimum(distance, 360.0 - distance).argmin())]


@dataclass(frozen=True)
class ComponentMeasure:
    """Coverage-weighted measurements of one component (lengths in pixels of its crop)."""

    color_rgb: np.ndarray
    area: float
    mass_x: float
    mass_y: float
    skew_x: float
    skew_y: float
    squareness: float
    aspect: float
    compactness: float


def _kurtosis(offsets: np.ndarray, weights: np.ndarray) -> float:
    second = weights @ offsets**2
    return float((weights @ offsets**4) / max(second * second, 1e-12))


def _skewness(offsets: np.ndarray, weights: np.ndarray) -> float:
    return float((weights @ offsets**3) / max(weights @ offsets**2, 1e-12) ** 1.5)


def measure_component(crop: np.ndarray, mask: np.ndarray, unsaturated: np.ndarray) -> ComponentMeasure:
    """Measure a component from its estimated per-pixel coverage.

    `crop` is the RGB crop around the component, `mask` its thresholded pixels, `unsaturated` the
    crop's background pixels. Coverage is the projection of each pixel's chromatic part (RGB minus
    its grey level, so background brightness does not matter) on the segment from the local
    background (median of a ring 3-4 px around the mask) to the object (median of its inner
    pixels): alpha matting with both ends read from the image.
    """
    inner = ndimage.binary_erosion(mask, _EIGHT_CONNECTED)
    color_rgb = np.median(crop[inner if inner.any() else mask], axis=0)
    chromatic = crop - crop.mean(axis=2, keepdims=True)
    ring = ndimage.binary_dilation(mask, _EIGHT_CONNECTED, iterations=4)
    ring &= ~ndimage.binary_dilation(mask, _EIGHT_CONNECTED, iterations=2) & unsaturated
    background = np.median(chromatic[ring], axis=0) if ring.any() else np.zeros(3)
    direction = color_rgb - color_rgb.mean() - background
    coverage = (chromatic - background) @ direction / max(float(direction @ direction), 1e-12)
    near = ndimage.binary_dilation(mask, _EIGHT_CONNECTED)
    coverage = np.where(near & (coverage >= MIN_COVERAGE), np.clip(coverage, 0.0, 1.0), 0.0)
    if not coverage.any():  # matting failed (object colour = background colour): use the mask
        coverage = mask.astype(np.float64)

    rows, cols = np.nonzero(coverage)
    weights = coverage[rows, cols]
    area = float(weights.sum())
    weights = weights / area
    x, y = cols + 0.5, rows + 0.5
    mass_x, mass_y = float(weights @ x), float(weights @ y)
    dx, dy = x - mass_x, y - mass_y
    diagonal, antidiagonal = (dx + dy) / np.sqrt(2), (dx - dy) / np.sqrt(2)
    variances = [float(weights @ t**2) for t in (dx, dy, diagonal, antidiagonal)]
    axial = (_kurtosis(dx, weights) + _kurtosis(dy, weights)) / 2
    diagonal_kurtosis = (_kurtosis(diagonal, weights) + _kurtosis(antidiagonal, weights)) / 2
    aspect = max(
        max(variances[0], variances[1]) / max(min(variances[0], variances[1]), 1e-12),
        max(variances[2], variances[3]) / max(min(variances[2], variances[3]), 1e-12),
    ) ** 0.5
    return ComponentMeasure(
        color_rgb=color_rgb,
        area=area,
        mass_x=mass_x,
        mass_y=mass_y,
        skew_x=_skewness(dx, weights),
        skew_y=_skewness(dy, weights),
        squareness=diagonal_kurtosis - axial,
        aspect=aspect,
        compactness=area / max(variances[0] + variances[1], 1e-12),
    )


def classify_shape(measure: ComponentMeasure) -> str:
    """Shape name from coverage moments (see the module docstring)."""
    if measure.aspect > MAX_ASPECT or measure.compactness < MIN_COMPACTNESS or abs(measure.skew_x) > MAX_SKEW:
        return "unknown"
    if measure.skew_y <= TRIANGLE_MAX_SKEW:
        return "triangle"
    if measure.skew_y > MAX_SKEW:
        return "unknown"
    if measure.squareness >= SQUARENESS:
        return "square"
    if measure.squareness <= -SQUARENESS:
        return "diamond"
    return "circle"


def detect_objects(image) -> list[Detection]:
    """Objects in an image (uint8 or float in [0, 1], HxWx3), top to bottom, then left to right."""
    pixels = as_float_image(image)
    height, width = pixels.shape[:2]
    chroma = pixels.max(axis=2) - pixels.min(axis=2)
    saturated = chroma >= CHROMA_THRESHOLD
    components, _ = ndimage.label(saturated, structure=_EIGHT_CONNECTED)
    min_area = MIN_AREA * height * width
    detections = []
    for number, box in enumerate(ndimage.find_objects(components), start=1):
        top, left = max(box[0].start - _CROP_PAD, 0), max(box[1].start - _CROP_PAD, 0)
        crop = slice(top, box[0].stop + _CROP_PAD), slice(left, box[1].stop + _CROP_PAD)
        mask = components[crop] == number
        if mask.sum() < min_area:
            continue
        measure = measure_component(pixels[crop], mask, ~saturated[crop])
        if measure.area < min_area:
            continue
        shape = classify_shape(measure)
        side = (measure.area / IDEAL_FILL[shape]) ** 0.5
        # A triangle's centre of mass sits 1/6 of its height below its box centre.
        centre_y = measure.mass_y - (side / 6 if shape == "triangle" else 0.0)
        detections.append(
            Detection(
                color=nearest_color(measure.color_rgb),
                shape=shape,
                size="large" if side / max(height, width) >= LARGE_MIN_SIDE else "small",
                x=(left + measure.mass_x) / width,
                y=(top + centre_y) / height,
                side=side / max(height, width),
                area=measure.area / (height * width),
            )
        )
    detections.sort(key=lambda d: (d.y, d.x))
    return detections


def relation_holds(subject: Detection, other: Detection, relation: str) -> bool:
    """Whether `subject` is `relation` `other` ("left of", "right of", "above", "below")."""
    return bool(
        relation_satisfied(other.x - subject.x, other.y - subject.y, relation, RELATION_MIN_OFFSET, RELATION_MAX_CROSS)
    )


def match(spec: CaptionSpec, detections: list[Detection]) -> VerifierResult:
    """Best one-to-one assignment of caption objects to detections, and the verdict."""
    candidates = [
        [d for d, det in enumerate(detections) if (det.color, det.shape, det.size) == (obj.color, obj.shape, obj.size)]
        + [None]
        for obj in spec.objects
    ]
    best_key, best = None, None
    for assignment in itertools.product(*candidates):
        used = [d for d in assignment if d is not None]
        if len(used) != len(set(used)):
            continue
        relation_ok = None
        if spec.relation is not None:
            subject, name, other = spec.relation
            pair = assignment[subject], assignment[other]
            relation_ok = None not in pair and relation_holds(detections[pair[0]], detections[pair[1]], name)
        key = (len(used), relation_ok is not False)
        if best_key is None or key > best_key:
            best_key, best = key, (assignment, relation_ok)
    assignment, relation_ok = best
    matched = [d is not None for d in assignment]
    return VerifierResult(spec, detections, matched, relation_ok, len(detections) - sum(matched))


def score_image(image, caption: str | CaptionSpec) -> VerifierResult:
    """Check an image against a caption (text of the toy grammar, or an already parsed spec)."""
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    return match(spec, detect_objects(image))


def summarize(results: list[VerifierResult]) -> dict:
    """GenEval-style figures: whole-prompt accuracy, object accuracy, accuracy by object count."""
    by_count: dict[str, list[bool]] = {}
    for result in results:
        by_count.setdefault(str(len(result.spec.objects)), []).append(result.correct)
    total_objects = sum(len(r.object_correct) for r in results)
    return {
        "n": len(results),
        "accuracy": sum(r.correct for r in results) / max(len(results), 1),
        "object_accuracy": sum(sum(r.object_correct) for r in results) / max(total_objects, 1),
        "by_num_objects": {k: sum(v) / len(v) for k, v in sorted(by_count.items())},
    }


def degrade(image, rng: np.random.Generator, noise_sigma: float = 0.03) -> np.ndarray:
    """The robustness test's corruption, float [H, W, 3] in [0, 1]: a 2x2 mean filter (each pixel
    becomes the mean of itself and its right, lower and lower-right neighbours, edges repeated),
    then i.i.d. Gaussian noise of std `noise_sigma` per channel, then clipping to [0, 1]."""
    pixels = as_float_image(image)
    padded = np.pad(pixels, ((0, 1), (0, 1), (0, 0)), mode="edge")
    blurred = (padded[:-1, :-1] + padded[1:, :-1] + padded[:-1, 1:] + padded[1:, 1:]) / 4
    return np.clip(blurred + rng.normal(0.0, noise_sigma, size=blurred.shape), 0.0, 1.0)
