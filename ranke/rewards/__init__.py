"""Rewards: the `Reward` protocol (`protocol`; a user's own reward, named `package.module:attribute`:
`user`), CLIP, LAION aesthetic, ImageReward and HPSv2 scorers, colorfulness, and their weighted
combination (`RewardTerm`: per-reward scale, normalisation, gradient); the toy world's judges
(`toy_clip`, the verifier, and `toy_features`, the Frechet-distance network, which scores no reward
but is trained beside the toy CLIPs by `ranke train-reward`).

Heavy dependencies (transformers, open_clip) are imported only when a scorer is constructed.
"""

from ranke.rewards.aesthetic import AestheticReward
from ranke.rewards.base import DualEncoderReward
from ranke.rewards.clip import CLIPReward
from ranke.rewards.colorfulness import ColorfulnessReward
from ranke.rewards.combine import CombinedReward, RewardOutput, RewardTerm, RunningStats
from ranke.rewards.hpsv2 import HPSv2Reward
from ranke.rewards.image_reward import ImageRewardScorer
from ranke.rewards.protocol import Reward, check_scores

__all__ = [
    "AestheticReward",
    "CLIPReward",
    "ColorfulnessReward",
    "CombinedReward",
    "DualEncoderReward",
    "HPSv2Reward",
    "ImageRewardScorer",
    "Reward",
    "RewardOutput",
    "RewardTerm",
    "RunningStats",
    "check_scores",
]
