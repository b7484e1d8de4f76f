"""Every choice-valued setting is checked in one place (`ranke.choices`) when a config is built."""

import pytest

from ranke import config as config_lib
from ranke.choices import CHOICES, choices_of
from ranke.config import RunConfig
from ranke.runtime import UserError


@pytest.mark.parametrize(
    "key, bad",
    [("precision", "fp16"), ("backbone.kind", "dalle"), ("text.padding", "middle"), ("tokenizer.recon_kind", "l3"),
     ("posttrain.perceptual", "vgg"), ("posttrain.mode", "decoders"), ("posttrain.eval_split", "test")],
)  # fmt: skip
def test_a_value_outside_its_choices_is_one_line_naming_the_key_and_the_choices(key, bad):
    with pytest.raises(UserError) as error:
        config_lib.load(RunConfig, "toy", [f"{key}={bad}"])
    assert str(error.value) == f"config key '{key}' is '{bad}'; allowed: one of {', '.join(choices_of(key))}"


def test_the_defaults_and_every_pattern_are_choices_of_something():
    config_lib.load(RunConfig, None)  # every default is one of its choices
    assert all(allowed and all(isinstance(value, str) for value in allowed) for _, allowed in CHOICES)
    assert choices_of("posttrain.perceptual_weight") is None  # a pattern names its key exactly
