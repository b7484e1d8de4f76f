"""Build the training reward named in a run config: `posttrain.rewards` maps reward names to weights,
`posttrain.reward_scale` / `reward_normalize` / `reward_gradient` adjust single rewards. A name is one
of REWARD_NAMES or the user's own reward, `package.module:attribute` (`ranke.rewards.user`), whose
class takes `posttrain.reward_args[name]`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ranke.assets import asset_path
from ranke.rewards.combine import CombinedReward, RewardTerm
from ranke.rewards.user import UserReward, build_user_reward, is_user_reward, resolve_user_reward
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
    args: dict[str, dict] = field(default_factory=dict)  # keyword arguments of user rewards' classes

    def check(self, names) -> None:
        for setting, values, kind in (("reward_scale", self.scale, (int, float)),
                                      ("reward_normalize", self.normalize, bool),
                                      ("reward_gradient", self.gradient, bool)):  # fmt: skip
            for name, value in values.items():
                if name not in names:
                    raise UserError(f"{setting} names '{name}', which is not in posttrain.rewards ({', '.join(names)})")
                if not isinstance(value, kind) or (kind != bool and isinstance(value, bool)):
                    raise UserError(f"{setting}.{name} must be {'true or false' if kind == bool else 'a number'}, got {value!r}")
        for name, value in self.args.items():
            if name not in names or not is_user_reward(name):
                raise UserError(f"reward_args names '{name}', which is not a package.module:attribute reward in posttrain.rewards")
            if not isinstance(value, dict):
                raise UserError(f"reward_args.{name} must be a mapping of keyword arguments, got {value!r}")


def check_reward_names(names, objects=()) -> None:
    """One line for the first reward name that is neither built in (REWARD_NAMES), a user's
    `package.module:attribute` that imports (`ranke.rewards.user.resolve_user_reward`), nor the
    name of a reward object given from Python (`objects`)."""
    if not names:
        raise UserError("posttrain.rewards is empty; name at least one reward, e.g. rewards={toy_clip: 1.0}")
    for name in objects:
        if name not in names:
            raise UserError(
                f"the reward object '{name}' has no weight: name it in posttrain.rewards, e.g. "
                f"cfg.posttrain.rewards = {{'{name}': 1.0}}"
            )
        if name in REWARD_NAMES or is_user_reward(name):
            raise UserError(f"the reward object '{name}' needs a name of its own, not a built-in or package.module:attribute one")
    for name in names:
        if name in objects:
            continue
        if is_user_reward(name):
            resolve_user_reward(name)
        elif name not in REWARD_NAMES:
            raise UserError(
                f"unknown reward '{name}' (one of: {', '.join(REWARD_NAMES)}, package.module:attribute, "
                "or a reward object given from Python)"
            )


def _need(path: str | None, key: str, what: str) -> str:
    if not path:
        raise UserError(f"the {what} reward needs {key}=<local path>")
    return path


class RewardModels:
    """Builds each reward of REWARD_NAMES by its name from local files, and the user's by
    importing them (with their `args`); CLIP is loaded once for `clip` and `aesthetic` (which
    reads its image tower)."""

    def __init__(self, files: RewardFiles, device: torch.device | str, args: dict[str, dict], objects: dict | None = None):
        self.files, self.device, self.args, self._clip = files, device, args, None
        self.objects = objects or {}  # reward objects given from Python, by name

    def build(self, name: str):
        if name in self.objects:
            return UserReward.of_object(name, self.objects[name])
        check_reward_names([name])
        if is_user_reward(name):
            return build_user_reward(name, self.device, self.args.get(name, {}))
        return getattr(self, name)()

    def toy_clip(self):
        from ranke.rewards.toy_clip import load_toy_clip

        return load_toy_clip(asset_path("reward_clip"), self.device, name="toy_clip")

    def verifier(self):
        from ranke.rewards.verifier import VerifierReward

        return VerifierReward()

    def colorfulness(self):
        from ranke.rewards.colorfulness import ColorfulnessReward

        return ColorfulnessReward()

    def clip(self):
        if self._clip is None:
            from ranke.rewards.clip import CLIPReward

            self._clip = CLIPReward(_need(self.files.clip_path, "clip_path", "clip / aesthetic"), self.device)
        return self._clip

    def aesthetic(self):
        from ranke.rewards.aesthetic import AestheticReward, load_aesthetic_head

        path = _need(self.files.aesthetic_path, "aesthetic_path", "aesthetic")
        image_tower = self.clip()
        return AestheticReward(image_tower, load_aesthetic_head(path, image_tower.model.config.projection_dim))

    def image_reward(self):
        from ranke.rewards.image_reward import ImageRewardScorer

        path = _need(self.files.image_reward_path, "image_reward_path", "image_reward")
        return ImageRewardScorer(path, self.files.image_reward_tokenizer, self.device)

    def hpsv2(self):
        from ranke.rewards.hpsv2 import HPSv2Reward

        return HPSv2Reward(_need(self.files.hpsv2_path, "hpsv2_path", "hpsv2"), self.device)


def build_reward(
    weights: dict[str, float],
    device: torch.device | str = "cpu",
    files: RewardFiles = RewardFiles(),
    settings: RewardSettings = RewardSettings(),
    objects: dict | None = None,
) -> CombinedReward:
    """A `CombinedReward` of the named rewards (see `RewardSettings` for the switches).

    toy_clip: the committed toy CLIP reward asset; verifier: the toy verifier (0/1, not
    differentiable); colorfulness: Hasler and Suesstrunk's colorfulness, an image statistic that is
    not realism (`ranke.rewards.colorfulness`); clip: CLIP from a local directory; aesthetic: the LAION predictor over that
    CLIP's image tower; image_reward: ImageReward from a local checkpoint and BERT tokenizer;
    hpsv2: HPSv2 from a local checkpoint (optional extra); `package.module:attribute`: the user's
    reward (`ranke.rewards.user`); a name of `objects`: that reward object, given from Python."""
    check_reward_names(weights, objects or {})
    settings.check(list(weights))
    models = RewardModels(files, device, settings.args, objects)
    terms = [
        RewardTerm(
            models.build(name),
            float(weight),
            scale=float(settings.scale.get(name, 1.0)),
            normalize=settings.normalize.get(name),
            gradient=settings.gradient.get(name),
        )
        for name, weight in weights.items()
    ]
    return CombinedReward(terms)


def build_posttrain_reward(pcfg, device: torch.device | str = "cpu", objects: dict | None = None) -> CombinedReward:
    """The reward a `PosttrainConfig` names: weights, local files and per-reward switches; the
    reward `objects` given from Python, by name."""
    files = RewardFiles(
        pcfg.clip_path, pcfg.hpsv2_path, pcfg.aesthetic_path, pcfg.image_reward_path, pcfg.image_reward_tokenizer
    )
    return build_reward(pcfg.rewards, device, files, posttrain_reward_settings(pcfg), objects)


def posttrain_reward_settings(pcfg) -> RewardSettings:
    """The per-reward switches and user rewards' arguments of a `PosttrainConfig`."""
    return RewardSettings(
        dict(pcfg.reward_scale), dict(pcfg.reward_normalize), dict(pcfg.reward_gradient), dict(pcfg.reward_args)
    )


def check_posttrain_rewards(pcfg, objects=()) -> None:
    """The rewards a `PosttrainConfig` names, checked without building them (when the config is
    validated): each name resolves (a user's module imports) or is one of the reward `objects`
    given from Python, each setting names one of them."""
    check_reward_names(pcfg.rewards, objects)
    posttrain_reward_settings(pcfg).check(list(pcfg.rewards))


def probe_user_rewards(reward: CombinedReward, image_size: int, device: torch.device | str) -> None:
    """Score a probe batch with each of the user's rewards in `reward` (`UserReward.probe`)."""
    for term in reward.terms:
        if isinstance(term.reward, UserReward):
            term.reward.probe(image_size, device)
