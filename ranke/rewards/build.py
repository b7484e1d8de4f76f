"""Build the training reward named in a run config: `posttrain.rewards` maps reward names to weights,
`posttrain.reward_scale` / `reward_normalize` / `reward_gradient` adjust single rewards."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ranke.assets import asset_path
from ranke.rewards.combine import CombinedReward, RewardTerm
from ranke.runtime import UserError

REWARD_NAMES = ("toy_clip", "verifier", "colorfulness", "clip", "aesthetic", "image_reward", "hpsv2")


@dataclass
class RewardFiles:
    """Local model files of the real-world rewards (never downloaded)."""

    clip_path: str | None = None  # CLIP directory (clip; aesthetic reads its image tower)
    hpsv2_path: str | None = None  # HPS_v2.1_compressed.pt
    aesthetic_path: str | None = None  # sac+logos+ava1-l14-linearMSE.pth
    image_reward_path: str | None = None  # ImageReward.pt
    image_reward_tokenizer: str | None = None  # bert-base-uncased tokenizer directory


@dataclass
class RewardSettings:
    """Per-reward switches, each a {reward name: value} map; a reward left out keeps the default
    (scale 1, normalised by running statistics, gradient when the reward is differentiable)."""

    scale: dict[str, float] = field(default_factory=dict)
    normalize: dict[str, bool] = field(default_factory=dict)
    gradient: dict[str, bool] = field(default_factory=dict)

    def check(self, names) -> None:
        for setting, values, kind in (("reward_scale", self.scale, (int, float)),
                                      ("reward_normalize", self.normalize, bool),
                                      ("reward_gradient", self.gradient, bool)):  # fmt: skip
            for name, value in values.items():
                if name not in names:
                    raise UserError(f"{setting} names '{name}', which is not in posttrain.rewards ({', '.join(names)})")
                if not isinstance(value, kind) or (kind != bool and isinstance(value, bool)):
                    raise UserError(f"{setting}.{name} must be {'true or false' if kind == bool else 'a number'}, got {value!r}")


def _need(path: str | None, key: str, what: str) -> str:
    if not path:
        raise UserError(f"the {what} reward needs {key}=<local path>")
    return path


def build_reward(
    weights: dict[str, float],
    device: torch.device | str = "cpu",
    files: RewardFiles = RewardFiles(),
    settings: RewardSettings = RewardSettings(),
) -> CombinedReward:
    """A `CombinedReward` of the named rewards (see `RewardSettings` for the switches).

    toy_clip: the committed toy CLIP reward asset; verifier: the toy verifier (0/1, not
    differentiable); colorfulness: Hasler and Suesstrunk's colorfulness, an image statistic that is
    not realism (`ranke.rewards.colorfulness`); clip: CLIP from a local directory; aesthetic: the LAION predictor over that
    CLIP's image tower; image_reward: ImageReward from a local checkpoint and BERT tokenizer;
    hpsv2: HPSv2 from a local checkpoint (optional extra)."""
    if not weights:
        raise UserError("posttrain.rewards is empty; name at least one reward, e.g. rewards={toy_clip: 1.0}")
    settings.check(list(weights))
    clip = None

    def shared_clip():
        nonlocal clip
        if clip is None:
            from ranke.rewards.clip import CLIPReward

            clip = CLIPReward(_need(files.clip_path, "clip_path", "clip / aesthetic"), device)
        return clip

    terms = []
    for name, weight in weights.items():
        if name == "toy_clip":
            from ranke.rewards.toy_clip import load_toy_clip

            reward = load_toy_clip(asset_path("reward_clip"), device, name="toy_clip")
        elif name == "verifier":
            from ranke.rewards.verifier import VerifierReward

            reward = VerifierReward()
        elif name == "colorfulness":
            from ranke.rewards.colorfulness import ColorfulnessReward

            reward = ColorfulnessReward()
        elif name == "clip":
            reward = shared_clip()
        elif name == "aesthetic":
            from ranke.rewards.aesthetic import AestheticReward, load_aesthetic_head

            path = _need(files.aesthetic_path, "aesthetic_path", "aesthetic")
            image_tower = shared_clip()
            reward = AestheticReward(image_tower, load_aesthetic_head(path, image_tower.model.config.projection_dim))
        elif name == "image_reward":
            from ranke.rewards.image_reward import ImageRewardScorer

            path = _need(files.image_reward_path, "image_reward_path", "image_reward")
            reward = ImageRewardScorer(path, files.image_reward_tokenizer, device)
        elif name == "hpsv2":
            from ranke.rewards.hpsv2 import HPSv2Reward

            reward = HPSv2Reward(_need(files.hpsv2_path, "hpsv2_path", "hpsv2"), device)
        else:
            raise UserError(f"unknown reward '{name}' (one of: {', '.join(REWARD_NAMES)})")
        terms.append(
            RewardTerm(
                reward,
                float(weight),
                scale=float(settings.scale.get(name, 1.0)),
                normalize=settings.normalize.get(name),
                gradient=settings.gradient.get(name),
            )
        )
    return CombinedReward(terms)


def build_posttrain_reward(pcfg, device: torch.device | str = "cpu") -> CombinedReward:
    """The reward a `PosttrainConfig` names: weights, local files and per-reward switches."""
    files = RewardFiles(
        pcfg.clip_path, pcfg.hpsv2_path, pcfg.aesthetic_path, pcfg.image_reward_path, pcfg.image_reward_tokenizer
    )
    settings = RewardSettings(dict(pcfg.reward_scale), dict(pcfg.reward_normalize), dict(pcfg.reward_gradient))
    return build_reward(pcfg.rewards, device, files, settings)
