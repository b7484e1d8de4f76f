"""`ranke eval --protocol coco30k` end to end on a tiny folder: COCO-style captions JSON, sampled
images, FID (toy features stand in for Inception here) and the prefixed CLIP score."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_rewards import _FakeOpenCLIP, fake_open_clip, tiny_clip_dir  # noqa: F401 (fixtures)

from PIL import Image

from ranke.cli import main
from ranke.eval.fid import folder_distance
from ranke.eval.prompt_set import CLIP_SCORE_PREFIX, clip_score_of_folder
from ranke.sample_folder import ModelChoice
from ranke.rewards.clip import CLIPReward
from ranke.runtime import UserError
from ranke.toy.data import heldout_prompts
from ranke.toy.tools import write_samples


def test_coco30k_protocol_on_a_tiny_folder(tmp_path, capsys, tiny_clip_dir, one_thread):  # noqa: F811
    prompts = heldout_prompts()[:12]
    annotations = [{"image_id": i % 6, "caption": c} for i, c in enumerate(prompts)]  # 2 captions per image
    (tmp_path / "captions.json").write_text(json.dumps({"annotations": annotations}))
    write_samples(6, tmp_path / "reference", split="heldout", seed=0)

    out = tmp_path / "eval"
    main(["eval", "--protocol", "coco30k", "--captions", str(tmp_path / "captions.json"), "--n", "6",
          "--ref-dir", str(tmp_path / "reference"), "--features", "toy", "--clip-path", str(tiny_clip_dir),
          "--out", str(out), "--batch-size", "4"])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 6 and metrics["seed"] == 42 and metrics["resolution"] == 64
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{i:05d}.png" for i in range(6)]
    reference = folder_distance(out / "images", tmp_path / "reference", "toy", size=64, batch_size=4)
    assert abs(metrics["fid"] - reference["fd"]) < 1e-6 * reference["fd"]
    for key in ("precision", "recall", "density", "coverage", "nearest_k"):  # of the same folders
        assert metrics[key] == reference[key], key

    records = [json.loads(line) for line in (out / "images" / "captions.jsonl").read_text().splitlines()]
    assert len({r["caption"] for r in records}) == 6  # one caption per COCO image
    scorer = CLIPReward(tiny_clip_dir, prefix=CLIP_SCORE_PREFIX)
    pixels = np.stack([np.asarray(Image.open(out / "images" / r["file"])) for r in records])
    expected = scorer(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255, [r["caption"] for r in records])
    assert abs(metrics["clip_score"] - expected.mean().item()) < 1e-4
    assert abs(clip_score_of_folder(out / "images", str(tiny_clip_dir), batch_size=2) - metrics["clip_score"]) < 1e-4


def test_hpsv2_benchmark_scores_each_style_and_averages(tmp_path, fake_open_clip):  # noqa: F811
    """With a stand-in for the optional open_clip package (tests/test_rewards.py): the protocol's
    sampling, per-style scoring and averaging, and its error for a missing style file."""
    from ranke.eval.prompt_set import HPSV2_STYLES, evaluate_hpsv2_benchmark, score_folder
    from ranke.rewards.hpsv2 import HPSv2Reward

    prompts = heldout_prompts()[:8]
    for index, style in enumerate(HPSV2_STYLES):
        (tmp_path / f"{style}.json").write_text(json.dumps(prompts[2 * index : 2 * index + 2]))
    checkpoint = tmp_path / "hps.pt"
    torch.manual_seed(0)
    torch.save(_FakeOpenCLIP().state_dict(), checkpoint)
    metrics = evaluate_hpsv2_benchmark(
        prompts_dir=str(tmp_path), hpsv2_path=str(checkpoint), out_dir=str(tmp_path / "out"),
        model=ModelChoice(overrides=("device=cpu",)), batch_size=2,
    )  # fmt: skip
    scorer = HPSv2Reward(checkpoint)
    for style in HPSV2_STYLES:
        expected = score_folder(tmp_path / "out" / "images" / style, scorer).mean().item()
        assert abs(metrics[style] - expected) < 1e-6
    assert abs(metrics["average"] - sum(metrics[s] for s in HPSV2_STYLES) / 4) < 1e-9
    (tmp_path / "photo.json").unlink()
    with pytest.raises(UserError, match="lacks photo.json"):
        evaluate_hpsv2_benchmark(prompts_dir=str(tmp_path), hpsv2_path=str(checkpoint), out_dir=str(tmp_path / "again"))
