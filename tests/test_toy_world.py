"""Toy world: scene sampler, renderer, caption grammar, data splits and the sample/verify tools."""

import json

import numpy as np
import pytest
from PIL import Image

from ranke.runtime import UserError
from ranke.toy.captions import (
    NUM_PHRASINGS,
    VOCABULARY,
    CaptionSpec,
    caption_for,
    caption_words,
    describe,
    parse_caption,
)
from ranke.toy.data import (
    ToyConfig,
    heldout_prompts,
    heldout_scenes,
    reference_images,
    render_caption,
    scene_for_caption,
    train_batch,
)
from ranke.toy.render import render_scene, render_scene_float, render_scenes
from ranke.toy.scenes import (
    BORDER_MARGIN,
    COLORS,
    OBJECT_GAP,
    PALETTE_RGB,
    RELATION_MAX_CROSS,
    RELATION_MIN_OFFSET,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    Background,
    ObjectSpec,
    PlacedObject,
    Scene,
    relation_satisfied,
    sample_scene,
)
from ranke.toy.tools import verify_dir, write_samples
from ranke.toy.verifier import score_image

GREY_GRADIENT = Background("linear", (0.2, 0.2, 0.2), (0.6, 0.6, 0.6), angle=0.0)


def _scene(*objects, relation=None, background=GREY_GRADIENT):
    return Scene(tuple(PlacedObject(ObjectSpec(*spec), x, y, r) for spec, x, y, r in objects), background, relation)


# --- scenes -------------------------------------------------------------------------------------


def test_sampler_and_renderer_are_deterministic_given_the_seed():
    first = [sample_scene(np.random.default_rng(7)) for _ in range(3)]
    again = [sample_scene(np.random.default_rng(7)) for _ in range(3)]
    other = sample_scene(np.random.default_rng(8))
    assert first == again
    assert other != first[0]
    assert np.array_equal(render_scene(first[0]), render_scene(again[0]))
    assert not np.array_equal(render_scene(first[0]), render_scene(other))


def test_sampled_scenes_respect_the_layout_rules():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(600)]
    counts = {len(s.objects) for s in scenes}
    assert counts == {1, 2, 3}
    seen = {attr: set() for attr in ("shape", "color", "size")}
    for scene in scenes:
        pairs = [(o.spec.shape, o.spec.color) for o in scene.objects]
        assert len(pairs) == len(set(pairs))
        for obj in scene.objects:
            for attr in seen:
                seen[attr].add(getattr(obj.spec, attr))
            low, high = SIZE_RADIUS[obj.spec.size]
            assert low <= obj.radius <= high
            for centre in (obj.x, obj.y):
                assert BORDER_MARGIN + obj.radius - 1e-9 <= centre <= 1 - BORDER_MARGIN - obj.radius + 1e-9
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                gap = max(abs(a.x - b.x), abs(a.y - b.y)) - a.radius - b.radius
                assert gap >= OBJECT_GAP - 1e-9
        if len(scene.objects) == 2:
            subject, name, other = scene.relation
            dx = scene.objects[other].x - scene.objects[subject].x
            dy = scene.objects[other].y - scene.objects[subject].y
            assert relation_satisfied(dx, dy, name, RELATION_MIN_OFFSET, RELATION_MAX_CROSS)
        else:
            assert scene.relation is None
    assert seen == {"shape": set(SHAPES), "color": set(COLORS), "size": set(SIZES)}


def test_relation_rule_on_hand_numbers():
    # B - A offsets: B is 0.3 to the right and 0.1 lower.
    assert relation_satisfied(0.3, 0.1, "left of", 0.25, 0.5)
    assert not relation_satisfied(0.3, 0.1, "right of", 0.25, 0.5)
    assert not relation_satisfied(0.3, 0.1, "above", 0.25, 0.5)
    assert not relation_satisfied(0.3, 0.2, "left of", 0.25, 0.5)  # too diagonal
    assert not relation_satisfied(0.2, 0.0, "left of", 0.25, 0.5)  # too close
    assert relation_satisfied(0.0, -0.4, "below", 0.25, 0.5)


# --- rendering ----------------------------------------------------------------------------------


def test_render_matches_hand_computed_pixels():
    # A red square whose box edges fall on pixel 23.5 and 40.5 (at 64 px): columns 23 and 40 are
    # half covered, column 24 fully covered; the gradient goes 0.2 -> 0.6 left to right.
    scene = _scene((("square", "red", "large"), 0.5, 0.5, 8.5 / 64))
    image = render_scene(scene, size=64, supersample=4)
    red = np.array(PALETTE_RGB["red"])

    def background(col):
        return 0.2 + 0.4 * (col + 0.5) / 64

    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert np.array_equal(image[0, 0], np.round([background(0) * 255] * 3))
    assert np.array_equal(image[32, 32], np.round(red * 255))
    assert np.array_equal(image[32, 24], np.round(red * 255))
    assert np.array_equal(image[32, 22], np.round([background(22) * 255] * 3))
    assert np.allclose(image[32, 23], np.round((0.5 * background(23) + 0.5 * red) * 255), atol=1)
    # Corner pixel (23, 23): a quarter covered.
    assert np.allclose(image[23, 23], np.round((0.75 * background(23) + 0.25 * red) * 255), atol=1)


def test_anti_aliased_coverage_sums_to_the_shape_area():
    size, radius = 64, 0.17
    ideal = {"circle": np.pi * radius**2, "square": 4 * radius**2, "triangle": 2 * radius**2, "diamond": 2 * radius**2}
    black = Background("linear", (0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    # Supersampling is point sampling: 4x4 is within 1.5% on slanted edges, 16x16 within 0.3%.
    for supersample, tolerance in ((4, 0.015), (16, 0.003)):
        for shape, area in ideal.items():
            scene = _scene(((shape, "red", "large"), 0.47, 0.53, radius), background=black)
            image = render_scene_float(scene, size, supersample)
            covered = image[..., 0].sum() / PALETTE_RGB["red"][0] / size**2
            assert covered == pytest.approx(area, rel=tolerance), (shape, supersample)


def test_backgrounds_are_low_saturation_and_objects_saturated():
    rng = np.random.default_rng(3)
    images = render_scenes([Scene((), sample_scene(rng).background) for _ in range(100)]) / 255.0
    saturation = (images.max(-1) - images.min(-1)) / np.maximum(images.max(-1), 1e-6)
    assert saturation.max() <= 0.25
    for rgb in PALETTE_RGB.values():
        assert max(rgb) - min(rgb) >= 0.55


# --- captions -----------------------------------------------------------------------------------


def test_captions_of_a_two_object_scene():
    scene = _scene(
        (("circle", "red", "large"), 0.25, 0.5, 0.17),
        (("square", "blue", "small"), 0.75, 0.5, 0.1),
        relation=(0, "left of", 1),
    )
    assert [caption_for(scene, k) for k in range(NUM_PHRASINGS)] == [
        "a large red circle to the left of a small blue square",
        "a small blue square to the right of a large red circle",
        "two objects: a large red circle to the left of a small blue square",
        "a large red circle is to the left of a small blue square",
    ]
    one = _scene((("triangle", "green", "small"), 0.5, 0.5, 0.1))
    assert caption_for(one, 0) == "a small green triangle"
    three = _scene(
        (("circle", "red", "large"), 0.25, 0.25, 0.1),
        (("square", "blue", "small"), 0.75, 0.25, 0.1),
        (("diamond", "cyan", "small"), 0.5, 0.75, 0.1),
    )
    assert caption_for(three, 2) == "a small blue square, a small cyan diamond and a large red circle"


def test_parse_inverts_every_phrasing_of_thousands_of_scenes():
    rng = np.random.default_rng(11)
    words = set()
    for _ in range(1500):
        scene = sample_scene(rng)
        expected = CaptionSpec.from_scene(scene).canonical()
        for phrasing in range(NUM_PHRASINGS):
            caption = caption_for(scene, phrasing)
            assert parse_caption(caption).canonical() == expected, caption
            words.update(caption_words(caption))
    assert words == set(VOCABULARY)


def test_parse_reads_exact_specs_and_accepts_case_and_full_stop():
    spec = parse_caption("A small Blue square to the right of a LARGE red circle.")
    square, circle = ObjectSpec("square", "blue", "small"), ObjectSpec("circle", "red", "large")
    assert spec == CaptionSpec((square, circle), (0, "right of", 1))
    assert spec.canonical() == CaptionSpec((circle, square), (0, "left of", 1))
    assert describe(spec, 0) == "a small blue square to the right of a large red circle"
    assert caption_words("three objects: a large red circle, a small blue square and a small cyan diamond")[:4] == [
        "three", "objects", ":", "a"
    ]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle",  # no size
        "a large red hexagon",
        "a large red circle left of a small blue square",
        "a large red circle and a small blue square",
        "a large red circle, a small blue square",
        "two objects: a large red circle",
        "three objects: a large red circle to the left of a small blue square",
        "a large red circle above",
        "a large red circle, a small blue square and a large green diamond and a small red circle",
    ],
)
def test_parse_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match="cannot parse caption"):
        parse_caption(text)


# --- data splits --------------------------------------------------------------------------------


def test_train_batch_is_a_seeded_stream_independent_of_batching():
    images, captions, scenes = train_batch(np.random.default_rng(5), 5)
    assert images.shape == (5, 3, 64, 64) and str(images.dtype) == "torch.float32"
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    rng = np.random.default_rng(5)
    first, second = train_batch(rng, 3), train_batch(rng, 2)
    assert captions == first[1] + second[1]
    assert scenes == first[2] + second[2]
    expected = render_scene(scenes[4]).transpose(2, 0, 1) / 255.0
    assert np.allclose(images[4].numpy(), expected, atol=1e-6)
    assert [parse_caption(c).canonical() for c in captions] == [CaptionSpec.from_scene(s).canonical() for s in scenes]


def test_heldout_prompts_are_fixed_and_apart_from_training():
    cfg = ToyConfig()
    prompts = heldout_prompts(cfg)
    assert len(prompts) == cfg.heldout_size
    prompts[0] = "changed"
    assert heldout_prompts(cfg)[0] != "changed"
    assert heldout_prompts(cfg)[:20] == heldout_prompts(ToyConfig(heldout_size=20))
    scenes = heldout_scenes(cfg)
    assert parse_caption(heldout_prompts(cfg)[3]).canonical() == CaptionSpec.from_scene(scenes[3]).canonical()
    _, train_captions, _ = train_batch(np.random.default_rng(0), 20)
    assert train_captions != heldout_prompts(cfg)[:20]


def test_reference_images_are_fixed_read_only_prefixes():
    cfg = ToyConfig()
    small = reference_images(cfg, 8)
    assert small.shape == (8, 64, 64, 3) and small.dtype == np.uint8
    assert np.array_equal(reference_images(cfg, 16)[:8], small)
    assert not small.flags.writeable
    assert not np.array_equal(small[0], small[1])


def test_render_caption_satisfies_the_caption():
    caption = "a small purple diamond below a large yellow circle"
    first = render_caption(caption, np.random.default_rng(0))
    second = render_caption(caption, np.random.default_rng(1))
    assert first.shape == (64, 64, 3) and not np.array_equal(first, second)
    assert score_image(first, caption).correct and score_image(second, caption).correct
    scene = scene_for_caption(caption, np.random.default_rng(2))
    # The relation reads subject 0 below object 1.
    assert scene.objects[0].spec == ObjectSpec("diamond", "purple", "small")
    assert scene.objects[0].y - scene.objects[1].y >= RELATION_MIN_OFFSET


# --- tools --------------------------------------------------------------------------------------


def test_write_samples_then_verify_dir_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKE_NO_PROGRESS", "1")
    write_samples(12, tmp_path / "train", split="train", seed=1)
    lines = [json.loads(line) for line in (tmp_path / "train" / "captions.jsonl").read_text().splitlines()]
    assert [line["file"] for line in lines] == [f"{i:05d}.png" for i in range(12)]
    assert all((tmp_path / "train" / line["file"]).is_file() for line in lines)
    result = verify_dir(tmp_path / "train")
    assert result["n"] == 12 and result["accuracy"] == 1.0 and result["object_accuracy"] == 1.0
    assert set(result["by_num_objects"]) <= {"1", "2", "3"} and all(v == 1.0 for v in result["by_num_objects"].values())

    write_samples(6, tmp_path / "heldout", split="heldout", seed=3)
    lines = [json.loads(line) for line in (tmp_path / "heldout" / "captions.jsonl").read_text().splitlines()]
    assert [line["caption"] for line in lines] == heldout_prompts()[:6]
    assert verify_dir(tmp_path / "heldout")["accuracy"] == 1.0


def test_verify_dir_resizes_and_counts_wrong_captions(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKE_NO_PROGRESS", "1")
    folder = tmp_path / "mixed"
    folder.mkdir()
    image = render_caption("a large red circle", np.random.default_rng(0))
    Image.fromarray(image).resize((128, 128), Image.Resampling.BICUBIC).save(folder / "big.png")
    Image.fromarray(image).save(folder / "same.jpg", quality=95, subsampling=0)
    captions = ["a large red circle", "a large blue circle"]
    with open(folder / "captions.jsonl", "w") as f:
        for name, caption in zip(["big.png", "same.jpg"], captions):
            f.write(json.dumps({"file": name, "caption": caption}) + "\n")
    result = verify_dir(folder)
    assert result == {"n": 2, "accuracy": 0.5, "object_accuracy": 0.5, "by_num_objects": {"1": 0.5}}


def _folder(tmp_path, lines, images=()):
    folder = tmp_path / "case"
    folder.mkdir()
    (folder / "captions.jsonl").write_text("".join(line + "\n" for line in lines))
    for name in images:
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / name)
    return folder


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "nowhere", "not found"),
        (lambda p: p, "captions.jsonl' not found"),
        (lambda p: _folder(p, []), "lists no images"),
        (lambda p: _folder(p, ["not json"]), "expected a JSON object"),
        (lambda p: _folder(p, ['{"file": "a.png", "caption": "a large red circle"}']), "not found"),
        (lambda p: _folder(p, ['{"file": "a.png", "caption": "a red blob"}'], ["a.png"]), "cannot parse caption"),
    ],
)
def test_verify_dir_user_errors(tmp_path, monkeypatch, make, message):
    monkeypatch.setenv("RANKE_NO_PROGRESS", "1")
    with pytest.raises(UserError, match=message):
        verify_dir(make(tmp_path))


def test_verify_dir_unreadable_image_and_bad_split(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKE_NO_PROGRESS", "1")
    folder = _folder(tmp_path, ['{"file": "a.png", "caption": "a large red circle"}'])
    (folder / "a.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot be read"):
        verify_dir(folder)
    with pytest.raises(UserError, match="unknown split"):
        write_samples(2, tmp_path / "x", split="test")
    with pytest.raises(UserError, match="held-out split has 3 prompts"):
        write_samples(4, tmp_path / "y", split="heldout", cfg=ToyConfig(heldout_size=3))
