"""GenEval: sampling into the benchmark's layout (toy backbone and a LlamaGen-layout model), the
rules on hand-built detections for every tag, the Mask2Former adapter on a tiny random model,
the colour classifier on a tiny CLIP, and the summary by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_llamagen import llamagen_files  # noqa: F401 (fixture)
from test_rewards import tiny_clip_dir  # noqa: F401 (fixture)

from ranke.cli import main
from ranke.eval.geneval import (
    SCORES_DIR,
    Rules,
    box_iou,
    folder_images,
    judge,
    keep_detections,
    read_metadata,
    relative_position,
    sample_geneval,
    score_geneval_folder,
    summarize,
)
from ranke.eval.geneval_models import (
    COLOR_TEMPLATES,
    COLORS,
    ColorClassifier,
    Detection,
    Mask2FormerDetector,
    geneval_name,
    instance_detections,
    mask_box,
    masks_at_image_size,
    object_crop,
)
from ranke.sample_folder import ModelChoice
from ranke.rewards.clip import CLIPReward
from ranke.runtime import UserError

TOY_METADATA = [
    {"tag": "single_object", "include": [{"class": "triangle", "count": 1}], "prompt": "a picture of a large red triangle"},
    {"tag": "counting", "include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}],
     "prompt": "a large red triangle, a large blue circle and a small red circle"},
    {"tag": "position", "include": [{"class": "square", "count": 1},
                                    {"class": "triangle", "count": 1, "position": ["below", 0]}],
     "prompt": "a large green triangle below a large green square"},
]  # fmt: skip


def write_metadata(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def relative_files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def expected_layout(n_prompts: int, n_per_prompt: int) -> list[str]:
    files = ["captions.jsonl", ".lock", "sampling.json"]  # beside GenEval's folders: ours (caption list, writer lock, provenance)
    for i in range(n_prompts):
        files += [f"{i:05d}/grid.png", f"{i:05d}/metadata.jsonl"]
        files += [f"{i:05d}/samples/{s:04d}.png" for s in range(n_per_prompt)]
    return sorted(files)


def check_layout(out, records, n_per_prompt, size):
    """The folder as GenEval's README describes it, file by file."""
    assert relative_files(out) == expected_layout(len(records), n_per_prompt)
    for index, record in enumerate(records):
        with open(out / f"{index:05d}" / "metadata.jsonl") as handle:
            assert json.load(handle) == record  # the evaluator reads it with json.load
        for s in range(n_per_prompt):
            with Image.open(out / f"{index:05d}" / "samples" / f"{s:04d}.png") as image:
                assert (image.mode, image.size) == ("RGB", (size, size))
        with Image.open(out / f"{index:05d}" / "grid.png") as grid:
            assert grid.size == (n_per_prompt * (size + 2) + 2, size + 4)
    listed = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [(r["file"], r["caption"]) for r in listed] == [
        (f"{i:05d}/samples/{s:04d}.png", record["prompt"]) for i, record in enumerate(records) for s in range(n_per_prompt)
    ]


# --- sampling -----------------------------------------------------------------------------------


def test_toy_backbone_samples_into_the_geneval_layout_and_resumes(tmp_path, capsys, one_thread):
    metadata = write_metadata(tmp_path / "evaluation_metadata.jsonl", TOY_METADATA)
    out = tmp_path / "geneval"
    args = ["eval", "--protocol", "geneval", "--metadata", metadata, "--out", str(out), "--n-per-prompt", "2",
            "--batch-size", "4"]  # fmt: skip
    main(args)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["n_prompts"], result["n_per_prompt"], result["n"], result["seed"]) == (3, 2, 6, 42)
    assert f'evaluation/evaluate_images.py "{out}"' in result["official_command"]
    check_layout(out, TOY_METADATA, 2, 64)
    assert [(p.relative_to(out).as_posix(), r) for p, r in folder_images(out)] == [
        (f"{i:05d}/samples/{s:04d}.png", record) for i, record in enumerate(TOY_METADATA) for s in range(2)
    ]

    # Resume: a lost image (batch 1 holds images 4 and 5) and grid are redrawn bit-exactly.
    before = {name: (out / name).read_bytes() for name in relative_files(out)}
    (out / "00002" / "samples" / "0001.png").unlink()
    (out / "00002" / "grid.png").unlink()
    main(args)
    assert {name: (out / name).read_bytes() for name in relative_files(out)} == before
    first_prompt = [np.asarray(Image.open(out / f"00000/samples/{s:04d}.png")) for s in range(2)]
    assert not np.array_equal(*first_prompt)  # two samples of one prompt differ

    # The same folder with other metadata is refused, not mixed.
    other = write_metadata(tmp_path / "other.jsonl", [TOY_METADATA[1], TOY_METADATA[0]])
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--protocol", "geneval", "--metadata", other, "--out", str(out), "--n-per-prompt", "2"])
    assert exit_info.value.code == 2
    assert "holds samples made with other settings (batch_size, n, prompts_sha256 differ)" in capsys.readouterr().err

    # --overwrite replaces the samples, the prompt folders and the listing with those of the new metadata
    main(["eval", "--protocol", "geneval", "--metadata", other, "--out", str(out), "--n-per-prompt", "1", "--overwrite"])
    swapped = [TOY_METADATA[1], TOY_METADATA[0]]
    check_layout(out, swapped, 1, 64)
    assert json.loads((out / "00000" / "metadata.jsonl").read_text()) == swapped[0]


def test_two_processes_sample_the_folder_of_one(tmp_path):
    """Under torchrun each process samples 2 rows of every batch of 4 (`ranke.sample_folder.sample_into_dir`)."""
    records = [*TOY_METADATA, dict(TOY_METADATA[0], prompt="a picture of a small yellow circle")]
    metadata = write_metadata(tmp_path / "evaluation_metadata.jsonl", records)
    on_cpu = ModelChoice(overrides=("device=cpu",))
    sample_geneval(metadata=metadata, out_dir=tmp_path / "one", model=on_cpu, n_per_prompt=2, seed=5, batch_size=4)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ranke.cli",
               "eval", "--protocol", "geneval", "--metadata", metadata, "--out", str(tmp_path / "two"),
               "--n-per-prompt", "2", "--seed", "5", "--batch-size", "4"]  # fmt: skip
    env = {**os.environ, "RANKE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300, check=False)
    assert done.returncode == 0, done.stdout.decode()[-8000:]
    assert '"processes": 2' in done.stdout.decode()  # the rows were split, not sampled twice
    check_layout(tmp_path / "two", records, 2, 64)
    for name in relative_files(tmp_path / "one"):
        if name == ".lock":  # the writer's pid
            continue
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        if name.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(one)), np.asarray(Image.open(two))), name
        else:
            assert one.read_text() == two.read_text(), name


def test_llamagen_layout_model_samples_into_the_geneval_layout(llamagen_files, tmp_path, capsys):  # noqa: F811
    _, flags = llamagen_files
    records = [
        {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a red circle"},
        {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
         "prompt": "a red circle and a blue square"},
    ]  # fmt: skip
    metadata = write_metadata(tmp_path / "evaluation_metadata.jsonl", records)
    out = tmp_path / "geneval"
    main(["eval", "--protocol", "geneval", "--metadata", metadata, "--out", str(out), "--n-per-prompt", "2",
          "--cfg", "4", *flags, "--image-size", "64"])  # fmt: skip (64 px: 4x4 tokens keep the test fast)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["n"], result["cfg_scale"]) == (4, 4.0)
    check_layout(out, records, 2, 64)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"tag": "colors", "prompt": "a red dog"}', "'include' must be a non-empty list"),
        ('{"tag": "colors", "include": [{"class": "dog"}], "prompt": "a dog"}', "positive integer 'count'"),
        ('{"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["left of", 0]}], "prompt": "p"}',
         "earlier include clause"),
        (('{"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, '
          '"position": ["beside", 0]}], "prompt": "p"}'), "relation one of"),
        ("not json", "not a JSON object"),
    ],
)
def test_bad_metadata_lines_are_user_errors_naming_the_line(tmp_path, line, message):
    path = tmp_path / "metadata.jsonl"
    path.write_text(json.dumps(TOY_METADATA[0]) + "\n" + line + "\n")
    with pytest.raises(UserError, match=f"metadata.jsonl:2: .*{message}"):
        read_metadata(path)


# --- the rules ----------------------------------------------------------------------------------


def box(x1, y1, x2, y2, score=0.95) -> Detection:
    return Detection((x1, y1, x2, y2), score)


def colors_from(table: dict):
    """A colour classifier for hand-built detections: the colour each detection was given."""
    return lambda name, found: [table[id(d)] for d in found]


def no_colors(name, found):
    raise AssertionError("colours are only classified for colour clauses")


SINGLE = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}


def test_single_object():
    assert judge(SINGLE, {}, no_colors) == (False, "expected bench>=1, found 0")
    assert judge(SINGLE, {"bench": [box(0, 0, 5, 5)]}, no_colors) == (True, "")
    # extra objects, of its class or others, are no error: there is no exclude clause
    assert judge(SINGLE, {"bench": [box(0, 0, 5, 5), box(9, 9, 20, 20)], "dog": [box(1, 1, 2, 2)]}, no_colors)[0]


def test_two_object():
    record = {"tag": "two_object", "include": [{"class": "bottle", "count": 1}, {"class": "sink", "count": 1}],
              "prompt": "a photo of a bottle and a sink"}  # fmt: skip
    assert judge(record, {"bottle": [box(0, 0, 5, 5)], "sink": [box(6, 6, 9, 9)]}, no_colors) == (True, "")
    assert judge(record, {"sink": [box(6, 6, 9, 9)]}, no_colors) == (False, "expected bottle>=1, found 0")
    assert judge(record, {}, no_colors) == (False, "expected bottle>=1, found 0\nexpected sink>=1, found 0")


def test_counting_with_its_threshold():
    record = {"tag": "counting", "include": [{"class": "bus", "count": 3}], "exclude": [{"class": "bus", "count": 4}],
              "prompt": "a photo of three buses"}  # fmt: skip
    buses = [box(10 * i, 0, 10 * i + 8, 8, score) for i, score in enumerate([0.99, 0.95, 0.92, 0.85])]
    kept = keep_detections({"bus": buses}, "counting")
    assert kept["bus"] == buses[:3]  # 0.85 is under the counting threshold 0.9
    assert judge(record, kept, no_colors) == (True, "")
    assert keep_detections({"bus": buses}, "two_object")["bus"] == buses  # 0.3 elsewhere
    assert judge(record, {"bus": buses}, no_colors) == (False, "expected bus<4, found 4")
    assert judge(record, {"bus": buses[:2]}, no_colors) == (False, "expected bus>=3, found 2")


def test_colors_checks_the_best_detections_only():
    record = {"tag": "colors", "include": [{"class": "potted plant", "count": 1, "color": "purple"}],
              "prompt": "a photo of a purple potted plant"}  # fmt: skip
    best, second = box(0, 0, 5, 5, 0.9), box(6, 6, 9, 9, 0.8)
    calls = []

    def classify(name, found):
        calls.append((name, found))
        return colors_from({id(best): "green", id(second): "purple"})(name, found)

    correct, reason = judge(record, {"potted plant": [best, second]}, classify)
    assert (correct, reason) == (False, "expected purple potted plant>=1, found 0 purple; and 1 green")
    assert calls == [("potted plant", [best])]
    assert judge(record, {"potted plant": [second]}, classify) == (True, "")
    assert judge(record, {}, classify) == (False, "expected potted plant>=1, found 0")


def test_color_attr_needs_both_colours():
    record = {"tag": "color_attr", "include": [{"class": "dining table", "count": 1, "color": "yellow"},
                                               {"class": "dog", "count": 1, "color": "pink"}],
              "prompt": "a photo of a yellow dining table and a pink dog"}  # fmt: skip
    table, dog = box(0, 0, 50, 30), box(60, 10, 80, 30)
    found = {"dining table": [table], "dog": [dog]}
    assert judge(record, found, colors_from({id(table): "yellow", id(dog): "pink"})) == (True, "")
    swapped = colors_from({id(table): "pink", id(dog): "yellow"})
    assert judge(record, found, swapped) == (
        False,
        "expected yellow dining table>=1, found 0 yellow; and 1 pink\nexpected pink dog>=1, found 0 pink; and 1 yellow",
    )


def test_relative_position_by_hand():
    a, b = box(0, 0, 10, 10), box(20, 0, 30, 10)
    # centres 20 apart in x, shrunk by 0.1 x (10 + 10) = 2: 18 / 20 = 0.9 > 0.5
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    assert relative_position(box(0, 0, 10, 10), box(0, 20, 10, 30)) == {"above"}
    assert relative_position(a, box(2, 0, 12, 10)) == set()  # offset 2 = the margin: no relation
    assert relative_position(a, a) == set()
    # a diagonal offset (-6, -8) of zero-height boxes 5 wide: x shrinks by 1 to -5, and -5 / 10 is
    # exactly -0.5, which is not "left of"; a little further left it is
    target = box(10, 10, 15, 10)
    assert relative_position(box(4, 2, 9, 2), target) == {"above"}
    assert relative_position(box(3.9, 2, 8.9, 2), target) == {"left of", "above"}
    assert relative_position(box(40, 40, 50, 50), a) == {"right of", "below"}


def test_position():
    record = {"tag": "position", "include": [{"class": "couch", "count": 1},
                                             {"class": "bird", "count": 1, "position": ["left of", 0]}],
              "prompt": "a photo of a bird left of a couch"}  # fmt: skip
    couch = box(40, 0, 60, 20)
    assert judge(record, {"couch": [couch], "bird": [box(0, 0, 10, 10)]}, no_colors) == (True, "")
    assert judge(record, {"couch": [couch], "bird": [box(70, 0, 80, 10)]}, no_colors) == (
        False, "expected bird left of target, found right of target")  # fmt: skip
    # a bird centred 3 px left of the couch, within the margin 0.1 x (10 + 20): no relation at all
    assert judge(record, {"couch": [couch], "bird": [box(42, 5, 52, 15)]}, no_colors) == (
        False, "expected bird left of target, found  target")  # fmt: skip
    assert judge(record, {"bird": [box(0, 0, 10, 10)]}, no_colors) == (
        False, "expected couch>=1, found 0\nno target for bird to be left of")  # fmt: skip
    # an extra bird on the wrong side is ignored: only the best `count` birds are checked
    birds = [box(0, 0, 10, 10, 0.9), box(70, 0, 80, 10, 0.8)]
    assert judge(record, {"couch": [couch], "bird": birds}, no_colors) == (True, "")


def test_keep_detections_threshold_limit_and_overlap():
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)  # inclusive pixels: 10 x 10 boxes
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0
    candidates = [box(0, 0, 9, 9, 0.5), box(5, 0, 14, 9, 0.6), box(0, 0, 9, 9, 0.3), box(50, 50, 60, 60, 0.31)]
    kept = keep_detections({"dog": candidates, "cat": [box(0, 0, 1, 1, 0.2)]}, "colors")
    assert kept == {"dog": [candidates[1], candidates[0], candidates[3]]}  # best first; 0.3 is not above 0.3
    suppressed = keep_detections({"dog": candidates}, "colors", Rules(max_overlap=0.3))
    assert suppressed == {"dog": [candidates[1], candidates[3]]}  # IoU 1/3 >= 0.3 with the better box
    assert keep_detections({"dog": candidates}, "colors", Rules(max_objects=2)) == {"dog": candidates[1::-1]}


def test_summary_by_hand():
    def record(tag, prompt, correct):
        return {"tag": tag, "metadata": json.dumps({"prompt": prompt}), "correct": correct}

    results = [record("single_object", "p0", True), record("single_object", "p0", False),
               record("single_object", "p1", False), record("single_object", "p1", False),
               record("position", "p2", True), record("position", "p2", True),
               record("counting", "p3", False), record("counting", "p3", True),
               record("counting", "p4", False), record("counting", "p4", False)]  # fmt: skip
    summary = summarize(results)
    assert list(summary["by_tag"]) == ["single_object", "position", "counting"]  # order of appearance
    assert summary["by_tag"] == {"single_object": 0.25, "position": 1.0, "counting": 0.25}
    assert summary["n_by_tag"] == {"single_object": 4, "position": 2, "counting": 4}
    assert summary["overall"] == pytest.approx((0.25 + 1.0 + 0.25) / 3)  # unweighted over tags
    assert summary["accuracy"] == pytest.approx(4 / 10)  # images
    assert (summary["n"], summary["n_prompts"]) == (10, 5)
    assert summary["prompt_accuracy"] == pytest.approx(3 / 5)  # p0, p2, p3 have a correct image


# --- the models ---------------------------------------------------------------------------------


def test_geneval_names_and_mask_boxes():
    assert [geneval_name(n) for n in ("dining_table", "Potted-Plant", "mouse", "remote", "keyboard", "dog")] == [
        "dining table", "potted plant", "computer mouse", "tv remote", "computer keyboard", "dog"]  # fmt: skip
    mask = np.zeros((4, 6), dtype=bool)
    mask[1:3, 2:5] = True
    assert mask_box(mask) == (2.0, 1.0, 5.0, 3.0)
    assert mask_box(np.zeros((4, 6), dtype=bool)) == (0.0, 0.0, 0.0, 0.0)


def test_instance_detections_by_hand():
    probabilities = torch.tensor([[0.6, 0.1, 0.3], [0.2, 0.5, 0.3]])  # two queries, classes dog, cat, no object
    masks = torch.full((2, 4, 6), -3.0)
    masks[0, 1:3, 2:5] = 2.0  # query 0's mask; query 1's is empty
    found = instance_detections(probabilities.log(), masks, ["dog", "cat"], max_per_image=3)
    # the three best (query, class) pairs: (0, dog) 0.6, (1, cat) 0.5, (1, dog) 0.2
    assert sorted(found) == ["cat", "dog"] and len(found["dog"]) == 2 and len(found["cat"]) == 1
    best = found["dog"][0]
    assert best.box == (2.0, 1.0, 5.0, 3.0)
    assert best.score == pytest.approx(0.6 * torch.sigmoid(torch.tensor(2.0)).item(), rel=1e-5)
    assert np.array_equal(best.mask, (masks[0] > 0).numpy())
    assert found["dog"][1].score == 0.0 and found["cat"][0].score == 0.0  # empty masks score 0
    assert found["cat"][0].box == (0.0, 0.0, 0.0, 0.0)


def test_masks_are_cut_out_of_the_padding_before_resizing():
    """A 16 x 16 input whose right half is padding; the query's logits are positive on the left
    half only: at the original image's size (10 x 5, the resized image's aspect) the mask covers it all."""
    logits = torch.tensor([[1.0, 1.0, -1.0, -1.0]]).repeat(4, 1)[None]  # [1, 4, 4] at 1/4 of the input
    pixel_mask = torch.zeros(16, 16, dtype=torch.long)
    pixel_mask[:, :8] = 1
    masks = masks_at_image_size(logits, pixel_mask, (10, 5))
    assert masks.shape == (1, 10, 5) and bool((masks > 0).all())
    unpadded = masks_at_image_size(logits, torch.ones(16, 16, dtype=torch.long), (10, 6))
    assert (unpadded > 0)[0, :, :3].all() and not (unpadded > 0)[0, :, 3:].any()


LABELS = {0: "circle", 1: "square", 2: "triangle", 3: "mouse"}


@pytest.fixture(scope="module")
def tiny_mask2former_dir(tmp_path_factory):
    """A randomly initialised tiny Mask2Former (Swin backbone, nothing pretrained) and its image
    processor, saved as save_pretrained does; no download."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    directory = tmp_path_factory.mktemp("tiny_mask2former")
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])  # fmt: skip
    config = Mask2FormerConfig(
        backbone_config=swin, use_pretrained_backbone=False, feature_size=32, mask_feature_size=32, hidden_dim=32,
        encoder_feedforward_dim=32, dim_feedforward=32, num_queries=5, encoder_layers=1, decoder_layers=2,
        num_attention_heads=2, num_labels=len(LABELS), id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
    )  # fmt: skip
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(directory)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}, size_divisor=32).save_pretrained(directory)
    return directory


def test_mask2former_adapter_on_a_tiny_random_model(tiny_mask2former_dir):
    detector = Mask2FormerDetector(tiny_mask2former_dir)
    assert detector.classes == ["circle", "square", "triangle", "computer mouse"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    found = detector(image)
    assert sum(len(v) for v in found.values()) == 5 * 4  # every (query, class) pair under the cap of 100
    for detections in found.values():
        assert [d.score for d in detections] == sorted((d.score for d in detections), reverse=True)
        for d in detections:
            assert d.mask.shape == (48, 40) and d.mask.dtype == bool  # at the image's size
            assert d.box == mask_box(d.mask) and 0.0 <= d.score <= 1.0
    again = detector(image)
    assert all(np.array_equal(a.mask, b.mask) and a.score == b.score for k in found for a, b in zip(found[k], again[k]))
    assert sum(len(v) for v in Mask2FormerDetector(tiny_mask2former_dir, max_per_image=7)(image).values()) == 7


def test_mask2former_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found or incomplete"):
        Mask2FormerDetector(tmp_path)


def test_object_crop_composites_onto_grey_and_crops_to_the_box():
    pixels = np.zeros((4, 5, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    mask = np.zeros((4, 5), dtype=bool)
    mask[1, 1] = mask[2, 2] = True
    crop = np.asarray(object_crop(Image.fromarray(pixels), Detection((0.6, 1.4, 3.0, 3.0), 0.9, mask)))
    assert crop.shape == (2, 2, 3)  # box rounded to (1, 1, 3, 3)
    assert crop[0, 0].tolist() == [200, 0, 0] and crop[1, 1].tolist() == [200, 0, 0]
    assert crop[0, 1].tolist() == [153, 153, 153] and crop[1, 0].tolist() == [153, 153, 153]
    whole = np.asarray(object_crop(Image.fromarray(pixels), Detection((1, 1, 3, 3), 0.9)))
    assert (whole == pixels[1:3, 1:3]).all()  # without a mask: the crop of the image itself


def test_color_classifier_is_clip_zero_shot_over_the_three_templates(tiny_clip_dir):  # noqa: F811
    classifier = ColorClassifier(tiny_clip_dir)
    clip = CLIPReward(tiny_clip_dir)
    weights = classifier.classifier("dog")
    for index in (0, 9):
        texts = [t.format(color=COLORS[index], name="dog") for t in COLOR_TEMPLATES]
        mean = clip.text_embeddings(texts).mean(dim=0)
        torch.testing.assert_close(weights[index], mean / mean.norm())
    assert texts[1] == "a photo of a white-colored dog" and texts[2] == "a photo of a white object"
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    detections = [Detection((2, 3, 12, 15), 0.9), Detection((10, 0, 30, 20), 0.8)]
    expected = []
    for d in detections:
        pixels = torch.from_numpy(np.array(object_crop(image, d))).permute(2, 0, 1)[None].float() / 255
        expected.append(COLORS[int((clip.image_embeddings(pixels) @ weights.T).argmax())])
    assert classifier(image, "dog", detections) == expected


def test_scoring_a_folder_writes_results_and_summary(tiny_mask2former_dir, tiny_clip_dir, tmp_path, capsys,  # noqa: F811
                                                      one_thread):
    records = [dict(TOY_METADATA[0], include=[{"class": "triangle", "count": 1, "color": "red"}], tag="colors"),
               *TOY_METADATA[1:]]  # fmt: skip
    metadata = write_metadata(tmp_path / "evaluation_metadata.jsonl", records)
    out = tmp_path / "geneval"
    main(["eval", "--protocol", "geneval", "--metadata", metadata, "--out", str(out), "--n-per-prompt", "2",
          "--detector", str(tiny_mask2former_dir), "--clip-path", str(tiny_clip_dir)])  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = [json.loads(line) for line in (out / SCORES_DIR / "results.jsonl").read_text().splitlines()]
    summary = json.loads((out / SCORES_DIR / "summary.json").read_text())
    assert [r["filename"] for r in results] == [str(p) for p, _ in folder_images(out)]
    assert all(set(r) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"} for r in results)
    assert all(r["correct"] == (r["reason"] == "") for r in results)
    assert {k: summary[k] for k in ("overall", "by_tag", "accuracy", "n")} == {
        k: summarize(results)[k] for k in ("overall", "by_tag", "accuracy", "n")}  # fmt: skip
    assert result["overall"] == summary["overall"] and summary["n"] == 6

    # With every threshold at 0 the colour path runs on the random detector's detections.
    scored = score_geneval_folder(out, str(tiny_mask2former_dir), str(tiny_clip_dir), Rules(0.0, 0.0))
    results = [json.loads(line) for line in (out / SCORES_DIR / "results.jsonl").read_text().splitlines()]
    for r in results:
        details = json.loads(r["details"])
        assert all(len(boxes) <= 16 and all(b[4] > 0 for b in boxes) for boxes in details.values())
    colour_checks = [r["reason"] for r in results if r["tag"] == "colors"]
    assert all(r == "" or r.startswith("expected red triangle>=1, found 0 red; and 1 ") for r in colour_checks)
    assert scored["rules"]["threshold"] == 0.0 and "not the official" in scored["scorer"]

    dog = dict(TOY_METADATA[0], include=[{"class": "dog", "count": 1}])
    unknown = write_metadata(tmp_path / "unknown.jsonl", [dog])
    with pytest.raises(SystemExit):
        main(["eval", "--protocol", "geneval", "--metadata", unknown, "--out", str(tmp_path / "other"),
              "--n-per-prompt", "1", "--detector", str(tiny_mask2former_dir), "--clip-path", str(tiny_clip_dir)])  # fmt: skip
    assert "has no class 'dog'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()  # refused before sampling
