"""`ranke build-toy-assets` at tiny sizes: all five assets, loadable, the policy on the new tokenizer's codes."""

from __future__ import annotations

import json

from test_recipes import TINY_TOKENIZER
from test_reward_train import tiny

from ranke.assets import ASSET_FILES
from ranke.backbones import load_toy_backbone
from ranke.cli import main

TINY_SFT = ["gpt.vocab_size=64", "gpt.dim=32", "gpt.n_layer=1", "gpt.n_head=2", "sft.steps=2", "sft.batch_size=4",
            "sft.eval_prompts=2", "sft.eval_samples=2", "tokenizer.steps=2"]  # fmt: skip


def test_builds_every_asset_then_reuses_them(tmp_path, capsys, one_thread):
    overrides = TINY_TOKENIZER + TINY_SFT + tiny("reward_clip") + tiny("eval_clip") + tiny("features")
    main(["build-toy-assets", "--out", str(tmp_path), *overrides])
    summary = json.loads((tmp_path / "build.json").read_text())
    assert set(summary["minutes"]) == {"tokenizer", "policy", "reward"}
    assert set(summary["sizes_mb"]) == set(ASSET_FILES.values()) and not summary["installed"]
    assets = tmp_path / "assets"
    backbone, cfg = load_toy_backbone(assets / ASSET_FILES["policy"], assets / ASSET_FILES["tokenizer"])
    assert backbone.policy.args.vocab_size == backbone.tokenizer.args.codebook_size == 64

    capsys.readouterr()
    main(["build-toy-assets", "--out", str(tmp_path), *overrides])
    assert capsys.readouterr().out.count("reusing") == 3
