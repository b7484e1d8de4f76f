"""The toy verifier: detection values, scoring rules, robustness on held-out renders."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from ranke.toy.captions import CONVERSE, CaptionSpec, describe, parse_caption
from ranke.toy.data import ToyConfig, heldout_prompts, render_caption
from ranke.toy.render import render_scene
from ranke.toy.scenes import COLORS, SHAPES, Background, ObjectSpec, PlacedObject, Scene
from ranke.toy.verifier import (
    CHROMA_THRESHOLD,
    Detection,
    VerifierResult,
    as_float_image,
    degrade,
    detect_objects,
    measure_component,
    relation_holds,
    score_image,
    summarize,
)

GREY = Background("radial", (0.45, 0.45, 0.5), (0.7, 0.68, 0.66), center=(0.3, 0.6), radius=0.8)


def _render(*objects, background=GREY, size=64):
    scene = Scene(tuple(PlacedObject(ObjectSpec(*spec), x, y, r) for spec, x, y, r in objects), background)
    return render_scene(scene, size)


def _heldout_renders(count):
    prompts = heldout_prompts(ToyConfig())[:count]
    rng = np.random.default_rng(0)
    return prompts, [render_caption(prompt, rng) for prompt in prompts]


def test_heldout_accuracy_clean_and_degraded():
    prompts, images = _heldout_renders(500)
    clean = summarize([score_image(image, prompt) for image, prompt in zip(images, prompts)])
    noise = np.random.default_rng(1)
    degraded = summarize([score_image(degrade(image, noise), prompt) for image, prompt in zip(images, prompts)])
    assert clean["n"] == 500 and clean["accuracy"] >= 0.99
    assert degraded["accuracy"] >= 0.95
    assert set(clean["by_num_objects"]) == {"1", "2", "3"}


def test_detections_read_back_the_scene():
    objects = [
        (("circle", "red", "large"), 0.27, 0.27, 0.18),
        (("square", "blue", "small"), 0.75, 0.22, 0.1),
        (("triangle", "green", "large"), 0.25, 0.73, 0.17),
        (("diamond", "purple", "small"), 0.74, 0.76, 0.11),
    ]
    ideal_fill = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}
    detections = detect_objects(_render(*objects))
    assert len(detections) == 4
    by_color = {d.color: d for d in detections}
    for (shape, color, size), x, y, radius in objects:
        found = by_color[color]
        assert (found.shape, found.size) == (shape, size)
        assert found.x == pytest.approx(x, abs=0.01) and found.y == pytest.approx(y, abs=0.01)
        assert found.side == pytest.approx(2 * radius, abs=0.01)
        assert found.area == pytest.approx(ideal_fill[shape] * 4 * radius**2, rel=0.03)
    # Reading order: top to bottom, then left to right.
    assert [d.color for d in detections] == ["blue", "red", "green", "purple"]


def _measure_single(image):
    pixels = as_float_image(image)
    saturated = pixels.max(2) - pixels.min(2) >= CHROMA_THRESHOLD
    labels, count = ndimage.label(saturated, np.ones((3, 3)))
    assert count == 1
    return measure_component(pixels, labels == 1, ~saturated)


@pytest.mark.parametrize(
    "shape, squareness, skew_y, compactness",
    [
        # Continuous-shape values: kurtosis of uniform 1.8, of triangular 2.4 marginals;
        # skewness of the ramp density 2y on [0, 1] is -2*sqrt(2)/5; area/(var_x + var_y).
        ("circle", 0.0, 0.0, 2 * np.pi),
        ("square", 0.6, 0.0, 6.0),
        ("diamond", -0.6, 0.0, 6.0),
        ("triangle", None, -2 * np.sqrt(2) / 5, 0.5 / (1 / 24 + 1 / 18)),
    ],
)
def test_coverage_moments_match_the_continuous_shapes(shape, squareness, skew_y, compactness):
    measure = _measure_single(_render(((shape, "cyan", "large"), 0.5, 0.5, 0.3), size=96))
    if squareness is not None:
        assert measure.squareness == pytest.approx(squareness, abs=0.03)
    assert measure.skew_y == pytest.approx(skew_y, abs=0.03)
    assert measure.skew_x == pytest.approx(0.0, abs=0.03)
    assert measure.compactness == pytest.approx(compactness, rel=0.02)


def test_input_layouts_agree():
    image = _render((("triangle", "yellow", "large"), 0.4, 0.5, 0.18))
    reference = detect_objects(image)
    assert reference[0].shape == "triangle"
    as_float = image / 255.0
    assert detect_objects(as_float) == reference
    assert detect_objects(torch.from_numpy(as_float).permute(2, 0, 1)) == reference
    single = detect_objects(as_float.astype(np.float32))[0]
    assert (single.shape, single.x) == (reference[0].shape, pytest.approx(reference[0].x))


def test_non_shapes_are_unknown_and_blank_images_empty():
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert detect_objects(blank) == []
    result = score_image(blank, "a large red circle")
    assert result.object_correct == [False] and not result.correct

    bar = blank.copy()
    bar[28:36, 10:50] = (220, 40, 40)
    assert [d.shape for d in detect_objects(bar)] == ["unknown"]
    upside_down = _render((("triangle", "red", "large"), 0.5, 0.5, 0.18))[::-1]
    assert [d.shape for d in detect_objects(upside_down)] == ["unknown"]


def test_relation_rule_on_hand_numbers():
    def at(x, y):
        return Detection("red", "circle", "small", x, y, side=0.2, area=0.03)

    a = at(0.2, 0.5)
    assert relation_holds(a, at(0.5, 0.55), "left of")
    assert relation_holds(at(0.5, 0.55), a, "right of")
    assert not relation_holds(a, at(0.5, 0.55), "above")
    assert not relation_holds(a, at(0.28, 0.5), "left of")  # 0.08 apart < 0.1
    assert not relation_holds(a, at(0.5, 0.85), "left of")  # the vertical offset dominates
    assert relation_holds(a, at(0.5, 0.85), "above")


def _two_object_image():
    caption = "a large red circle to the left of a small blue square"
    image = _render((("circle", "red", "large"), 0.27, 0.45, 0.17), (("square", "blue", "small"), 0.72, 0.55, 0.1))
    return caption, image


def test_wrong_captions_are_rejected_object_by_object():
    caption, image = _two_object_image()
    right = score_image(image, caption)
    assert right.correct and right.object_correct == [True, True] and right.relation_correct and right.extra == 0
    cases = {
        "a large green circle to the left of a small blue square": ([False, True], False),
        "a large red diamond to the left of a small blue square": ([False, True], False),
        "a large red circle to the left of a large blue square": ([True, False], False),
        "a large red circle to the right of a small blue square": ([True, True], False),
        "a large red circle above a small blue square": ([True, True], False),
        "a small blue square to the right of a large red circle": ([True, True], True),
    }
    for text, (objects, relation) in cases.items():
        result = score_image(image, text)
        assert (result.object_correct, result.relation_correct) == (objects, relation), text
        assert result.correct == (all(objects) and relation)
    # One object of two wrong: the image's other object is left over as an extra detection.
    assert score_image(image, "a large green circle to the left of a small blue square").extra == 1


def test_extra_objects_fail_the_prompt_but_not_the_objects():
    image = _render((("circle", "red", "large"), 0.3, 0.3, 0.17), (("square", "blue", "small"), 0.75, 0.75, 0.1))
    result = score_image(image, "a large red circle")
    assert result.object_correct == [True] and result.extra == 1 and not result.correct
    assert result.object_accuracy == 1.0


def test_identical_objects_are_matched_with_the_relation():
    caption = "a small red circle above a small red circle"
    image = render_caption(caption, np.random.default_rng(4))
    result = score_image(image, caption)
    assert result.correct and result.relation_correct


def test_mutated_heldout_captions_are_rejected():
    prompts, images = _heldout_renders(120)
    rng = np.random.default_rng(2)
    rejected = 0
    for prompt, image in zip(prompts, images):
        spec = parse_caption(prompt)
        objects = list(spec.objects)
        target = objects[0]
        used_colors = {o.color for o in objects}
        field = rng.choice(["color", "shape", "size", "relation"] if spec.relation else ["color", "shape", "size"])
        if field == "color":
            color = str(rng.choice([c for c in COLORS if c not in used_colors]))
            objects[0] = ObjectSpec(target.shape, color, target.size)
        elif field == "shape":
            shape = str(rng.choice([s for s in SHAPES if s != target.shape]))
            objects[0] = ObjectSpec(shape, target.color, target.size)
        elif field == "size":
            objects[0] = ObjectSpec(target.shape, target.color, "large" if target.size == "small" else "small")
        relation = spec.relation
        if field == "relation":
            subject, name, other = relation
            relation = (subject, CONVERSE[name], other)
        wrong = describe(CaptionSpec(tuple(objects), relation), int(rng.integers(4)))
        rejected += not score_image(image, wrong).correct
    assert rejected == len(prompts)


def test_summarize_counts():
    spec1 = CaptionSpec((ObjectSpec("circle", "red", "small"),))
    spec2 = CaptionSpec((ObjectSpec("circle", "red", "small"), ObjectSpec("square", "blue", "large")), (0, "above", 1))
    results = [
        VerifierResult(spec1, [], [True], None, 0),
        VerifierResult(spec1, [], [False], None, 0),
        VerifierResult(spec2, [], [True, True], True, 0),
        VerifierResult(spec2, [], [True, False], False, 1),
    ]
    assert summarize(results) == {
        "n": 4,
        "accuracy": 0.5,
        "object_accuracy": 4 / 6,
        "by_num_objects": {"1": 0.5, "2": 0.5},
    }


def test_degrade_is_the_documented_blur_and_noise():
    checker = np.indices((8, 8)).sum(0) % 2
    image = np.repeat(checker[..., None], 3, axis=2).astype(np.float64)
    blurred = degrade(image, np.random.default_rng(0), noise_sigma=0.0)
    assert np.allclose(blurred[:-1, :-1], 0.5)  # every interior 2x2 window holds two 1s
    flat = np.full((64, 64, 3), 0.5)
    noisy = degrade(flat, np.random.default_rng(0), noise_sigma=0.03)
    assert noisy.mean() == pytest.approx(0.5, abs=0.002) and noisy.std() == pytest.approx(0.03, rel=0.05)
