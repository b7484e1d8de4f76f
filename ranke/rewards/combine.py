"""Several rewards as one: each component scaled, optionally normalised by its running mean/std,
then weighted.

METHOD.md: "Several rewards are combined as a weighted sum, each normalised by a running
mean/std." Normalisation puts rewards of different scales (CLIP ~30, HPSv2 ~0.25) on a common
footing so that the weights mean what they say. The RankE release instead sums the raw scores
with their weights (`normalize_rewards=False`), HPSv2 multiplied by 100 and computed without
gradient: `RewardTerm`'s `scale`, `normalize` and `gradient` reproduce that per reward.

Decisions:
* Statistics are exact over every finite value seen so far (not an EMA): the running
  (count, mean, M2) is merged with each batch by Chan et al.'s parallel update.
* Statistics are updated BEFORE the current batch is normalised. The first batch is then
  normalised by its own moments instead of by arbitrary initial values, and the batch is
  treated exactly like the ones before it.
* A non-finite component value (NaN/inf) is counted, warned about once per component, kept
  out of the statistics and contributes 0 to the total: a NaN never reaches the advantages.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ranke.rewards.protocol import Reward, check_scores

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


class RunningStats:
    """Exact streaming mean and (population) variance of all values seen.

    Update rule: a batch with n values, mean m_b and sum of squared deviations M2_b is merged
    into the running (N, m, M2) as (Chan et al. 1979)

        delta = m_b - m,  N' = N + n,  m' = m + delta * n / N',
        M2' = M2 + M2_b + delta^2 * N * n / N',

    so the result equals the moments of the concatenation of all batches. Before any value is
    seen the normalisation is the identity (mean 0, variance 1).
    """

    def __init__(self) -> None:
        self.count = 0.0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count > 0 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def merge(self, count: float, mean: float, m2: float) -> None:
        """Merge the moments (count, mean, M2) of another set of values."""
        if count <= 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total

    def update(self, values: torch.Tensor, reduce_sum: ReduceSum | None = None) -> None:
        """Merge a batch of finite values.

        `reduce_sum`, when given, sums the float64 tensor (count, sum, sum of squares), kept on
        the values' device, over processes (e.g. an all-reduce); every process then merges the
        same global batch and the statistics stay identical.
        Sums are taken around the current running mean, which all processes share, so that
        the sum of squares does not lose precision when the mean is large.
        """
        shifted = values.detach().to(torch.float64).flatten() - self.mean
        count = torch.tensor(float(shifted.numel()), dtype=torch.float64, device=shifted.device)
        sums = torch.stack([count, shifted.sum(), shifted.square().sum()])
        if reduce_sum is not None:
            sums = reduce_sum(sums)
        count, first, second = (float(s) for s in sums)
        if count > 0:
            self.merge(count, self.mean + first / count, second - first * first / count)

    def normalize(self, values: torch.Tensor, eps: float) -> torch.Tensor:
        """(values - mean) / (std + eps); the statistics are constants, gradients reach `values` only."""
        return (values - self.mean) / (self.std + eps)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


@dataclass
class RewardOutput:
    """What `CombinedReward` returns for a batch of B images.

    `total`: weighted sum of the (normalised) components, always finite, [B].
    `components`: each reward's score times its scale, before normalisation (may hold NaN), [B].
    `nonfinite`: number of non-finite raw scores per component in this batch.
    """

    total: torch.Tensor
    components: dict[str, torch.Tensor]
    nonfinite: dict[str, int]


def score_in_fp32(reward: Reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """`reward` on float32 images with autocast off: inside a bf16 stage rewards stay float32,
    since their values rank the rollouts and their gradients reach the decoder."""
    with torch.autocast(images.device.type, enabled=False):
        return reward(images.float(), prompts).float()


@dataclass
class RewardTerm:
    """One component of a `CombinedReward`: `weight * normalise(scale * reward)`.

    `normalize` None follows the combination's default; `gradient` None follows the reward's
    `differentiable`, False scores without a graph and leaves the term out of `differentiable_score`.
    """

    reward: Reward
    weight: float
    scale: float = 1.0
    normalize: bool | None = None
    gradient: bool | None = None

    @property
    def name(self) -> str:
        return self.reward.name

    @property
    def differentiable(self) -> bool:
        return self.reward.differentiable if self.gradient is None else self.gradient and self.reward.differentiable

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """`scale` x the reward's fp32 score, with its graph only when the term is differentiable."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
            return self.scale * score_in_fp32(self.reward, images, prompts)


class CombinedReward:
    """Weighted sum of rewards, each scaled and optionally normalised by its running mean/std.

    `components` are `RewardTerm`s or (reward, weight) pairs (scale 1, the default normalisation,
    the reward's own differentiability). Call with `update_stats=False` when re-scoring images
    that were already scored (the decoder stage re-scores its own decodes of the rollouts), so
    no value is counted twice.
    """

    def __init__(
        self,
        components: list[RewardTerm | tuple[Reward, float]],
        normalize: bool = True,
        eps: float = 1e-6,
        reduce_sum: ReduceSum | None = None,
    ) -> None:
        if not components:
            raise ValueError("CombinedReward needs at least one reward")
        terms = [term if isinstance(term, RewardTerm) else RewardTerm(term[0], term[1]) for term in components]
        names = [term.name for term in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        for term in terms:
            term.weight = float(term.weight)
            term.normalize = normalize if term.normalize is None else term.normalize
        self.terms = terms
        self.eps = eps
        self.reduce_sum = reduce_sum
        self.stats = {name: RunningStats() for name in names}
        self._warned: set[str] = set()

    @property
    def differentiable(self) -> bool:
        """True when at least one component passes gradients back to the pixels."""
        return any(term.differentiable for term in self.terms)

    def __call__(self, images: torch.Tensor, prompts: list[str], update_stats: bool = True) -> RewardOutput:
        batch = images.shape[0]
        terms: list[torch.Tensor] = []
        raw_scores: dict[str, torch.Tensor] = {}
        nonfinite: dict[str, int] = {}
        for term in self.terms:
            reward, weight = term.reward, term.weight
            raw = check_scores(reward.name, term.score(images, prompts), batch, finite=False)
            finite = torch.isfinite(raw)
            bad = int((~finite).sum())
            if bad and reward.name not in self._warned:
                self._warned.add(reward.name)
                warnings.warn(
                    f"reward '{reward.name}' returned {bad} non-finite value(s); they count as 0 "
                    "and are left out of its running statistics (further occurrences are only counted)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            value = raw
            if term.normalize:
                stats = self.stats[reward.name]
                if update_stats:
                    stats.update(raw[finite], self.reduce_sum)
                value = stats.normalize(raw, self.eps)
            terms.append(weight * torch.where(finite, value, torch.zeros_like(value)))
            raw_scores[reward.name] = raw
            nonfinite[reward.name] = bad
        return RewardOutput(total=torch.stack(terms).sum(0), components=raw_scores, nonfinite=nonfinite)

    def differentiable_score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor | None:
        """Weighted sum of the scaled, un-normalised scores of the differentiable components, with
        their graph (the decoder stage's R in L_reward), or None when no component is differentiable.

        Not normalised: the running statistics are a property of the rollout batches, and the
        loss weight lambda_d is stated for the reward model's own scale."""
        terms = [term.weight * term.score(images, prompts) for term in self.terms if term.differentiable]
        return torch.stack(terms).sum(0) if terms else None

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {name: stats.state_dict() for name, stats in self.stats.items()}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        if set(state) != set(self.stats):
            raise ValueError(f"reward statistics for {sorted(state)} cannot be loaded into {sorted(self.stats)}")
        for name, stats in self.stats.items():
            stats.load_state_dict(state[name])
