"""The range table of the config keys: every bundled preset lies inside it, and each kind of key
gets the range its meaning needs."""

from __future__ import annotations

import math

import pytest

from ranke import config as config_lib
from ranke.config import CONFIG_DIR, RunConfig
from ranke.domains import check_value, domain_of, validate
from ranke.runtime import UserError


@pytest.mark.parametrize("preset", sorted(path.stem for path in CONFIG_DIR.glob("*.yaml")))
def test_every_bundled_preset_is_inside_the_table(preset):
    validate(config_lib.load(RunConfig, preset))


@pytest.mark.parametrize(
    "key, inside, outside",
    [
        ("posttrain.policy_lr", [1e-6, 3.0], [0.0, -1e-5, math.nan, math.inf]),
        ("sft.lr", [1e-3], [0.0]),
        ("posttrain.policy_ema_decay", [0.0, 0.999, 1.0], [1.01, -0.1]),
        ("posttrain.keep_checkpoints", [0, 3], [-1]),  # 0: keep all
        ("posttrain.eval_every", [0, 10], [-1]),  # 0: only at the end
        ("posttrain.save_every", [1], [0]),
        ("tokenizer.betas[1]", [0.0, 0.95], [1.0]),  # a list item has its list's range
        ("sampling.top_p", [0.5, 1.0], [0.0, 1.5]),
        ("posttrain.clip_eps", [0.2], [0.0, 1.0]),
        ("posttrain.rewards.toy_clip", [-2.0, 0.0, 1.0], [math.nan]),  # any finite weight
        ("seed", [0, 2**40], [-1]),
    ],
)
def test_ranges_of_each_kind_of_key(key, inside, outside):
    for value in inside:
        check_value(key, value)
    for value in outside:
        with pytest.raises(UserError, match=f"config key '{key.replace('[', '.').replace(']', '.')}' is"):
            check_value(key, value)


def test_strings_booleans_and_unset_values_pass():
    for value in ("fp32", True, None):
        check_value("posttrain.policy_lr", value)
    assert domain_of("text.toy_encoding").describe() == "a finite number"
