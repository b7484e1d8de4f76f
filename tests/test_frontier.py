"""The reward-fidelity frontier: metrics read at matched reward gain along each run, paired by seed."""

from __future__ import annotations

import json

import pytest

from ranke.eval.frontier import TrajectoryPoint, common_gain, decoder_gain_parts, matched_gain_difference, value_at_gain
from ranke.eval.runs import frontier_by_seed
from ranke.eval.study import Method, MethodSpec
from ranke.eval.tables import frontier_table


def trajectory(*pairs):
    return [TrajectoryPoint(gain, value) for gain, value in pairs]


def test_the_value_is_interpolated_at_the_first_crossing():
    run = trajectory((0.0, 40.0), (0.5, 42.0), (1.5, 46.0), (0.8, 50.0), (2.0, 60.0))
    assert value_at_gain(run, 1.0) == pytest.approx(44.0)  # between (0.5, 42) and (1.5, 46): t = 0.5
    assert value_at_gain(run, 1.5) == pytest.approx(46.0)
    assert value_at_gain(run, 1.7) == pytest.approx(57.5)  # the first crossing of 1.7 is (0.8, 50) -> (2.0, 60): t = 0.75
    assert value_at_gain(run, 0.0) == 40.0  # the start
    assert value_at_gain(run, 2.5) is None  # never reached


def test_the_start_counts_when_it_already_reaches_the_gain():
    assert value_at_gain(trajectory((0.0, 40.0), (0.4, 41.0)), -0.3) == 40.0
    with pytest.raises(ValueError, match="at least its start"):
        value_at_gain([], 1.0)


def test_the_common_gain_is_the_highest_every_run_reaches():
    grpo = {0: trajectory((0.0, 40.0), (1.2, 44.0)), 1: trajectory((0.0, 40.0), (2.0, 43.0), (0.9, 45.0))}
    ranke = {0: trajectory((0.0, 40.0), (1.6, 41.0)), 1: trajectory((0.0, 40.0), (1.0, 41.0))}
    assert common_gain(grpo, ranke) == 1.0
    with pytest.raises(ValueError, match="at least one run"):
        common_gain({})


def test_the_matched_gain_difference_is_paired_by_seed():
    a = {0: trajectory((0.0, 40.0), (2.0, 44.0)), 1: trajectory((0.0, 40.0), (2.0, 48.0)), 2: trajectory((0.0, 40.0), (2.0, 46.0))}
    b = {0: trajectory((0.0, 40.0), (1.0, 41.0)), 1: trajectory((0.0, 40.0), (1.0, 42.0)), 2: trajectory((0.0, 40.0), (1.0, 43.0))}
    # at gain 1: A is 42, 44, 43 and B is 41, 42, 43 -> differences 1, 2, 0: mean 1, s = 1, t(0.975, 2) = 4.302653
    difference = matched_gain_difference(a, b, 1.0)
    assert difference.n == 3 and difference.mean == pytest.approx(1.0)
    assert difference.high - difference.mean == pytest.approx(4.302653 / 3**0.5, rel=1e-6)
    short = {0: trajectory((0.0, 40.0), (0.5, 41.0)), **{seed: b[seed] for seed in (1, 2)}}
    assert matched_gain_difference(a, short, 1.0).n == 2  # seed 0 of B never reaches gain 1


def write_run(folder, seed, rows, decoder="base"):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"seed: {seed}\n")
    (folder / "eval.jsonl").write_text("".join(json.dumps({"decoder": decoder, **row}) + "\n" for row in rows))
    return folder


def test_the_frontier_table_reads_each_run_at_the_common_gain(tmp_path):
    sft = {"reward": 90.0, "fd": 40.0, "kid": 1.0}
    grpo_fd, ranke_fd = (44.0, 48.0, 46.0), (41.0, 42.0, 43.0)
    grpo = Method(MethodSpec("GRPO", (), "base"), [
        write_run(tmp_path / f"grpo{seed}", seed, [{"step": 50, "reward": 92.0, "fd": fd, "kid": 1.0}])
        for seed, fd in enumerate(grpo_fd)])  # fmt: skip
    ranke = Method(MethodSpec("RankE", (), "ema"), [
        write_run(tmp_path / f"ranke{seed}", seed, [{"step": 50, "reward": 91.0, "fd": fd, "kid": 1.0}], "ema")
        for seed, fd in enumerate(ranke_fd)])  # fmt: skip
    assert frontier_by_seed(grpo, sft, "fd")[1] == trajectory((0.0, 40.0), (2.0, 48.0))
    assert frontier_by_seed(grpo, sft, "precision") == {}  # evaluated before the metric existed
    # at gain 1 (RankE's highest): GRPO 42, 44, 43 vs RankE 41, 42, 43 -> differences 1, 2, 0
    rows = frontier_table(sft, [(grpo, ranke)]).splitlines()
    fd_row = next(row for row in rows if "| FD |" in row)
    half = 4.302653 / 3**0.5
    assert fd_row.startswith(f"| GRPO - RankE | +1.00 | FD | +1.0 [{1 - half:+.1f}, {1 + half:+.1f}] | 3 |")
    assert "| KID | +0.000 [+0.000, +0.000] | 3 |" in next(row for row in rows if "| KID |" in row)


def test_an_adapted_decoders_gain_splits_into_real_codes_and_policy_tokens():
    # seeds 0-2: frozen FD 50, 46, 44 -> adapted 47, 45, 44: gains on the policy's tokens 3, 1, 0;
    # real codes 28 with the base decoder -> 27, 28, 26 adapted: gains 1, 0, 2; specific 2, 1, -2
    parts = decoder_gain_parts({0: 50.0, 1: 46.0, 2: 44.0, 3: 40.0}, {0: 47.0, 1: 45.0, 2: 44.0}, 28.0,
                               {0: 27.0, 1: 28.0, 2: 26.0})  # fmt: skip
    half = 4.302653 / 3**0.5  # t(0.975, 2) / sqrt(3), times each sample's standard deviation
    assert (parts.on_policy_tokens.mean, parts.on_policy_tokens.n) == (pytest.approx(4 / 3), 3)
    assert parts.on_policy_tokens.high - parts.on_policy_tokens.mean == pytest.approx(half * (7 / 3) ** 0.5, rel=1e-6)
    assert parts.on_real_codes.mean == pytest.approx(1.0)
    assert parts.on_real_codes.high - 1.0 == pytest.approx(half * 1.0, rel=1e-6)
    assert parts.specific_to_policy.mean == pytest.approx(1 / 3)
    assert parts.specific_to_policy.low == pytest.approx(1 / 3 - half * (13 / 3) ** 0.5, rel=1e-6)
    with pytest.raises(ValueError, match="a seed with the frozen and the adapted"):
        decoder_gain_parts({0: 1.0}, {1: 1.0}, 28.0, {1: 1.0})
