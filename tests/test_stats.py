"""Intervals over seeds, paired differences and the verdicts they allow, against hand-computed values."""

from __future__ import annotations

import pytest

from ranke.eval.stats import (
    NOT_SEPARATED,
    ONE_SEED,
    Interval,
    gain_interval,
    mean_interval,
    paired_differences,
    paired_interval,
    verdict,
)


def test_mean_interval_is_student_t_with_n_minus_1_dof():
    # [1, 2, 3, 4]: mean 2.5, s = sqrt(5 / 3) = 1.290994, t(0.975, 3) = 3.182446 -> half 2.054260
    interval = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert interval.mean == pytest.approx(2.5)
    assert interval.low == pytest.approx(2.5 - 2.054260, abs=1e-5)
    assert interval.high == pytest.approx(2.5 + 2.054260, abs=1e-5)
    assert interval.n == 4 and interval.half_width() == pytest.approx(2.054260, abs=1e-5)
    # 90%: t(0.95, 3) = 2.353363 -> half 1.519090
    assert mean_interval([1.0, 2.0, 3.0, 4.0], 0.90).half_width() == pytest.approx(1.519090, abs=1e-5)


def test_one_value_has_no_interval():
    interval = mean_interval([3.0])
    assert interval == Interval(3.0, None, None, 1)
    assert not interval.defined and not interval.excludes_zero()


def test_paired_differences_use_the_common_seeds_in_order():
    a, b = {2: 11.0, 0: 10.0, 1: 12.0}, {0: 9.0, 1: 10.0, 2: 11.0, 3: 5.0}
    assert paired_differences(a, b) == [1.0, 2.0, 0.0]
    # mean 1, s = 1, t(0.975, 2) = 4.302653 -> half 4.302653 / sqrt(3) = 2.484138: contains 0
    interval = paired_interval(a, b)
    assert interval.mean == pytest.approx(1.0)
    assert (interval.low, interval.high) == pytest.approx((1 - 2.484138, 1 + 2.484138), abs=1e-5)
    assert verdict(interval, "higher", "RankE", "reward") == NOT_SEPARATED
    with pytest.raises(ValueError, match="no seed in common"):
        paired_interval({0: 1.0}, {1: 1.0})


def test_verdict_follows_the_interval_and_the_direction_of_the_metric():
    # differences -1.0, -1.2, -0.8: mean -1, s = 0.2 -> half 4.302653 * 0.2 / sqrt(3) = 0.496828
    interval = mean_interval([-1.0, -1.2, -0.8])
    assert interval.high == pytest.approx(-1 + 0.496828, abs=1e-5)
    assert verdict(interval, "lower", "RankE", "FD") == "RankE lower FD (better)"
    assert verdict(interval, "higher", "RankE", "reward") == "RankE lower reward (worse)"
    rising = mean_interval([1.0, 1.2, 0.8])
    assert verdict(rising, "higher", "RankE", "CLIP score") == "RankE higher CLIP score (better)"
    assert verdict(rising, "lower") == "higher (worse)"
    assert verdict(rising, None, "GRPO", "colorfulness") == "GRPO higher colorfulness"  # no better direction
    assert verdict(mean_interval([-0.1, 0.1]), None, "GRPO", "colorfulness") == NOT_SEPARATED
    assert verdict(mean_interval([0.5]), "lower", "RankE", "FD") == ONE_SEED  # never better/worse from one seed
    assert verdict(mean_interval([0.0, 0.0]), "lower") == NOT_SEPARATED  # a zero-width interval at 0
    with pytest.raises(ValueError, match="higher"):
        verdict(interval, "up")


def test_gain_over_a_shared_start():
    # gains 0.5, 1.0, 1.5 over 90: mean 1, s = 0.5 -> half 4.302653 * 0.5 / sqrt(3) = 1.242069
    interval = gain_interval([90.5, 91.0, 91.5], 90.0)
    assert interval.mean == pytest.approx(1.0)
    assert interval.low == pytest.approx(1.0 - 1.242069, abs=1e-5)
    assert not interval.excludes_zero()
    assert gain_interval([91.0, 91.1, 90.9, 91.0, 91.05], 90.0).low > 0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least one value"):
        mean_interval([])
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([1.0, 2.0], 1.0)
