"""Rewards: the `Reward` protocol, CLIP and HPSv2 scorers, and their normalised combination; the
toy world's judges (`toy_clip`, the verifier, and `toy_features`, the Frechet-distance network,
which scores no reward but is trained beside the toy CLIPs by `ranke train-reward`).

Heavy dependencies (transformers, open_clip) are imported only when a scorer is constructed.
"""

from ranke.rewards.base import DualEncoderReward, Reward
from ranke.rewards.clip import CLIPReward
from ranke.rewards.combine import CombinedReward, RewardOutput, RunningStats
from ranke.rewards.hpsv2 import HPSv2Reward

__all__ = [
    "CLIPReward",
    "CombinedReward",
    "DualEncoderReward",
    "HPSv2Reward",
    "Reward",
    "RewardOutput",
    "RunningStats",
]
