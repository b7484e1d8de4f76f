"""The reward-fidelity frontier: a metric compared at matched reward gain, not at matched steps.

Two methods that reach different rewards cannot be compared on fidelity at the same step: the one
that optimised less may simply have moved less. Along each run's trajectory of evaluations
(step 0 is the shared start, reward gain 0), the metric *at reward gain g* is read where the run
first reaches g, linearly interpolated between the two evaluations that bracket that crossing:

    t = (g - gain_i) / (gain_{i+1} - gain_i),   metric(g) = metric_i + t * (metric_{i+1} - metric_i)

for the first i with gain_i < g <= gain_{i+1}. A run that never reaches g has no value there. The
paired comparison at g takes, seed by seed, A's value minus B's over the seeds where both reach g,
with the Student-t interval of `ranke.eval.stats`. The gain compared (`common_gain`) is the
largest one every run of both methods reaches, so no seed is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ranke.eval.stats import Interval, paired_interval


@dataclass(frozen=True)
class TrajectoryPoint:
    """One evaluation of a run: its reward gain over the shared start and a fidelity metric."""

    gain: float
    value: float


def value_at_gain(points: Sequence[TrajectoryPoint], gain: float) -> float | None:
    """The metric where the trajectory `points` (in step order, starting at gain 0) first reaches
    `gain`, interpolated linearly (module docstring); None when it never does."""
    if not points:
        raise ValueError("a trajectory needs at least its start")
    if points[0].gain >= gain:
        return points[0].value
    for before, after in zip(points, points[1:]):
        if before.gain < gain <= after.gain:
            t = (gain - before.gain) / (after.gain - before.gain)
            return before.value + t * (after.value - before.value)
    return None


def highest_gain(points: Sequence[TrajectoryPoint]) -> float:
    return max(point.gain for point in points)


def common_gain(*runs_of_methods: dict[int, Sequence[TrajectoryPoint]]) -> float:
    """The largest reward gain that every run of every method reaches (>= 0: every run starts at 0)."""
    gains = [highest_gain(points) for runs in runs_of_methods for points in runs.values()]
    if not gains:
        raise ValueError("common_gain needs at least one run")
    return min(gains)


def matched_gain_difference(
    a: dict[int, Sequence[TrajectoryPoint]], b: dict[int, Sequence[TrajectoryPoint]], gain: float
) -> Interval:
    """Interval over seeds of A's metric minus B's, each read where its run first reaches `gain`
    (seeds where either run never reaches it are left out; `common_gain` avoids that)."""
    at_a = {seed: value for seed, points in a.items() if (value := value_at_gain(points, gain)) is not None}
    at_b = {seed: value for seed, points in b.items() if (value := value_at_gain(points, gain)) is not None}
    return paired_interval(at_a, at_b)


@dataclass(frozen=True)
class DecoderGainParts:
    """An adapted decoder's FD gain over the frozen one, taken apart (each paired over seeds)."""

    on_policy_tokens: Interval  # FD(frozen, policy's tokens) - FD(adapted, the same tokens)
    on_real_codes: Interval  # FD(base decoder, real codes) - FD(adapted, real codes): a better decoder overall
    specific_to_policy: Interval  # the first minus the second: what only the shifted tokens gain


def decoder_gain_parts(
    frozen_fd: dict[int, float], adapted_fd: dict[int, float], base_real_codes_fd: float, adapted_real_codes_fd: dict[int, float]
) -> DecoderGainParts:
    """Split an adapted decoder's FD gain on a policy's tokens (positive = better) into the part it
    also gives on the real images' ground-truth codes and the part specific to the policy's tokens
    (Latent Covariate Shift proper):

        gain_tokens = FD_frozen - FD_adapted,   gain_real = FD_base(real codes) - FD_adapted(real codes),
        specific = gain_tokens - gain_real

    per seed (`frozen_fd`, `adapted_fd` and `adapted_real_codes_fd` by training seed; the base
    decoder's real-code FD is one number every seed shares), each with its paired interval."""
    seeds = sorted(set(frozen_fd) & set(adapted_fd) & set(adapted_real_codes_fd))
    if not seeds:
        raise ValueError("decoder_gain_parts needs a seed with the frozen and the adapted decoder's figures")
    on_tokens = {seed: frozen_fd[seed] - adapted_fd[seed] for seed in seeds}
    on_real = {seed: base_real_codes_fd - adapted_real_codes_fd[seed] for seed in seeds}
    zero = dict.fromkeys(seeds, 0.0)
    return DecoderGainParts(
        on_policy_tokens=paired_interval(on_tokens, zero),
        on_real_codes=paired_interval(on_real, zero),
        specific_to_policy=paired_interval(on_tokens, on_real),
    )
