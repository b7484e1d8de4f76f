"""Build the training reward named in a run config: `posttrain.rewards` maps reward names to weights."""

from __future__ import annotations

import torch

from ranke.assets import asset_path
from ranke.rewards.combine import CombinedReward
from ranke.runtime import UserError

REWARD_NAMES = ("toy_clip", "verifier", "clip", "hpsv2")


def build_reward(
    weights: dict[str, float],
    device: torch.device | str = "cpu",
    clip_path: str | None = None,
    hpsv2_path: str | None = None,
) -> CombinedReward:
    """A `CombinedReward` of the named rewards (running-normalised, weighted).

    toy_clip: the committed toy CLIP reward asset; verifier: the toy verifier (0/1, not
    differentiable); clip: CLIP from the local directory `clip_path`; hpsv2: HPSv2 from the
    local checkpoint `hpsv2_path` (optional extra)."""
    if not weights:
        raise UserError("posttrain.rewards is empty; name at least one reward, e.g. rewards={toy_clip: 1.0}")
    components = []
    for name, weight in weights.items():
        if name == "toy_clip":
            from ranke.rewards.toy_clip import load_toy_clip

            reward = load_toy_clip(asset_path("reward_clip"), device, name="toy_clip")
        elif name == "verifier":
            from ranke.rewards.verifier import VerifierReward

            reward = VerifierReward()
        elif name == "clip":
            from ranke.rewards.clip import CLIPReward

            if not clip_path:
                raise UserError("the clip reward needs clip_path=<local CLIP model directory>")
            reward = CLIPReward(clip_path, device)
        elif name == "hpsv2":
            from ranke.rewards.hpsv2 import HPSv2Reward

            if not hpsv2_path:
                raise UserError("the hpsv2 reward needs hpsv2_path=<local HPSv2 checkpoint>")
            reward = HPSv2Reward(hpsv2_path, device)
        else:
            raise UserError(f"unknown reward '{name}' (one of: {', '.join(REWARD_NAMES)})")
        components.append((reward, float(weight)))
    return CombinedReward(components)
