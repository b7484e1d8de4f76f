"""`ranke train-reward`: the three toy judges from the run config's `reward` section (tiny sizes)."""

from __future__ import annotations

import json

import pytest
import yaml

from ranke import config as config_lib
from ranke.assets import ASSET_FILES, asset_path
from ranke.cli import main
from ranke.config import RunConfig
from ranke.rewards.toy_clip import load_toy_clip
from ranke.rewards.toy_features import load_toy_features


def tiny(name: str) -> list[str]:
    if name == "features":
        sizes = "steps=2 batch_size=8 warmup_steps=1 eval_scenes=20 fd_images=20 model.width=8 model.feature_dim=16"
    else:
        sizes = "steps=2 batch_size=8 warmup_steps=1 eval_prompts=100 eval_group=50 model.width=8 model.text_width=8"
    return [f"reward.{name}.{item}" for item in sizes.split()]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, one_thread):
    run = tmp_path_factory.mktemp("reward") / "run"
    overrides = tiny("reward_clip") + tiny("eval_clip") + tiny("features") + ["reward.eval_clip.model.width=16"]
    main(["train-reward", "--out", str(run), *overrides])
    return run


def test_writes_the_three_assets_under_their_committed_names(reward_run):
    reward = load_toy_clip(reward_run / ASSET_FILES["reward_clip"])
    evaluation = load_toy_clip(reward_run / ASSET_FILES["eval_clip"])
    features = load_toy_features(reward_run / ASSET_FILES["features"])
    assert reward.model.args.width == 8 and evaluation.model.args.width == 16
    assert features.model.args.feature_dim == 16
    assert not (reward_run / "reward_clip" / "toy_clip.safetensors").exists()  # moved, not copied


def test_summary_has_retrieval_and_fd_figures(reward_run):
    summary = json.loads((reward_run / "summary.json").read_text())
    assert list(summary) == ["reward_clip", "eval_clip", "features"]
    for name in ("reward_clip", "eval_clip"):
        assert 0.0 <= summary[name]["retrieval_top1"] <= 1.0 and summary[name]["group"] == 50
        assert summary[name]["steps"] == 2 and summary[name]["train_seconds"] >= 0
    # each model starts from the run seed plus its own offset (0, 1, 2 by default)
    assert [summary[name]["seed"] for name in summary] == [0, 1, 2]
    assert summary["features"]["fd_real"] > 0 and set(summary["features"]["fd_blur"]) == {"0.5", "1.0", "2.0"}
    assert summary["features"]["asset"].endswith(ASSET_FILES["features"])
    saved = config_lib.build(RunConfig, yaml.safe_load((reward_run / "config.yaml").read_text()))
    assert saved.reward.reward_clip.steps == 2 and saved.reward.eval_clip.model.width == 16


def test_models_picks_a_subset(tmp_path, one_thread):
    main(["train-reward", "--out", str(tmp_path), "reward.models=[features]", *tiny("features")])
    assert (tmp_path / ASSET_FILES["features"]).is_file()
    assert not (tmp_path / ASSET_FILES["reward_clip"]).exists()
    assert list(json.loads((tmp_path / "summary.json").read_text())) == ["features"]


def test_default_section_matches_the_committed_judges():
    """The committed CLIPs were trained with the section's defaults (widths 32 and 24)."""
    reward = RunConfig().reward
    assert reward.reward_clip.model == load_toy_clip(asset_path("reward_clip")).model.args
    assert reward.eval_clip.model == load_toy_clip(asset_path("eval_clip")).model.args
    assert reward.features.model == load_toy_features(asset_path("features")).model.args
    assert (reward.reward_clip.seed_offset, reward.eval_clip.seed_offset) == (0, 1)
