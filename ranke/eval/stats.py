"""Statistics over seeds: means with 95% intervals, paired differences, and verdicts that follow them.

A method's metric over n seeds is summarised by its mean and the Student-t interval

    mean ± t_{(1 + c) / 2, n - 1} * s / sqrt(n),   s: sample standard deviation (n - 1 in the denominator).

Two methods are compared on the same seeds (each seed gives both the same start, prompts and
rollout stream), so the comparison is the interval of the per-seed differences A - B, which
removes the variation the seeds share. A difference is called only when its interval excludes 0;
with one seed there is no interval and nothing is called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ONE_SEED = "one seed: no interval"
NOT_SEPARATED = "not separated"


@dataclass(frozen=True)
class Interval:
    """Mean of n values and its confidence interval [low, high] (None when n < 2: undefined)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def defined(self) -> bool:
        return self.low is not None

    def excludes_zero(self) -> bool:
        return self.defined and (self.low > 0 or self.high < 0)

    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2


def mean_interval(values: list[float], confidence: float = 0.95) -> Interval:
    """Mean and Student-t confidence interval (n - 1 degrees of freedom) of `values`."""
    from scipy import stats

    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, None, None, n)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_differences(a_by_seed: dict[int, float], b_by_seed: dict[int, float]) -> list[float]:
    """A - B for every seed both have, in seed order (a seed one of them lacks is left out)."""
    return [a_by_seed[seed] - b_by_seed[seed] for seed in sorted(set(a_by_seed) & set(b_by_seed))]


def paired_interval(a_by_seed: dict[int, float], b_by_seed: dict[int, float], confidence: float = 0.95) -> Interval:
    """Interval of the mean paired difference A - B over the seeds both have."""
    differences = paired_differences(a_by_seed, b_by_seed)
    if not differences:
        raise ValueError("no seed in common: a paired difference needs runs of both methods on the same seed")
    return mean_interval(differences, confidence)


def gain_interval(values: list[float], start: float, confidence: float = 0.95) -> Interval:
    """Interval of a method's gain over the start every seed shares (e.g. the SFT policy's metric)."""
    return mean_interval([v - start for v in values], confidence)


def verdict(difference: Interval, better: str | None, subject: str = "", metric: str = "") -> str:
    """What an interval of a difference (subject minus something) allows one to say.

    `better` is "higher" or "lower" (which way the metric improves), or None for a metric with no
    better direction (a statistic to compare with real images). Returns ONE_SEED without an
    interval, NOT_SEPARATED when it contains 0, else e.g. "RankE lower FD (better)" (with None:
    "RankE higher colorfulness")."""
    if better not in ("higher", "lower", None):
        raise ValueError(f"better must be 'higher', 'lower' or None, got {better!r}")
    if not difference.defined:
        return ONE_SEED
    if not difference.excludes_zero():
        return NOT_SEPARATED
    direction = "higher" if difference.low > 0 else "lower"
    said = " ".join(part for part in (subject, direction, metric) if part)
    if better is None:
        return said
    return said + f" ({'better' if direction == better else 'worse'})"
