"""The allowed range of every numeric setting, checked when a config is built.

`DOMAINS` is a table of (dotted-key pattern, range); the first pattern that matches a key
(`fnmatch`, so `*` spans dots; list items take their list's) gives its range, and every number must be finite whatever its
key. A value outside its range is refused with one line naming the key and the range, e.g.

    config key 'posttrain.policy_lr' is nan; allowed: a finite number > 0
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ranke.runtime import UserError


@dataclass(frozen=True)
class Range:
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.low == -math.inf and self.high == math.inf:
            return "a finite number"
        if self.high == math.inf:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        return f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0, 1)
ANY = Range()

DOMAINS: list[tuple[str, Range]] = [
    # counts where 0 means "off" / "none" / "all"
    ("posttrain.micro_batch_size", NON_NEGATIVE),
    ("posttrain.keep_checkpoints", NON_NEGATIVE),
    ("posttrain.eval_samples", NON_NEGATIVE),
    ("*eval_every", NON_NEGATIVE),
    ("*check_replicas_every", NON_NEGATIVE),
    ("*restart_dead_codes_every", NON_NEGATIVE),
    ("max_consecutive_skips", NON_NEGATIVE),
    ("sampling.top_k", NON_NEGATIVE),
    ("*hard_negatives", NON_NEGATIVE),
    ("*warmup_steps", NON_NEGATIVE),
    ("*disc_start", NON_NEGATIVE),
    ("*consistency_*_step", NON_NEGATIVE),
    ("*object_margin", NON_NEGATIVE),
    ("*.depth", NON_NEGATIVE),
    ("*num_res_blocks", NON_NEGATIVE),
    ("*_offset", NON_NEGATIVE),
    ("*seed", NON_NEGATIVE),
    ("posttrain.dynamic_sampling_draws", NON_NEGATIVE),
    ("posttrain.group_size", Range(2)),
    ("posttrain.lora.rank", AT_LEAST_ONE),
    ("posttrain.lora.alpha", POSITIVE),
    # counts and sizes
    ("*.steps", AT_LEAST_ONE),
    ("*batch_size", AT_LEAST_ONE),
    ("*_every", AT_LEAST_ONE),
    ("*prompts_per_step", AT_LEAST_ONE),
    ("*grpo_epochs", AT_LEAST_ONE),
    ("*top_k", AT_LEAST_ONE),
    ("*eval_samples", AT_LEAST_ONE),
    ("*eval_prompts", AT_LEAST_ONE),
    ("*eval_images", AT_LEAST_ONE),
    ("*eval_scenes", AT_LEAST_ONE),
    ("*eval_group", AT_LEAST_ONE),
    ("*fd_images", AT_LEAST_ONE),
    ("*grid_prompts", AT_LEAST_ONE),
    ("*image_size", AT_LEAST_ONE),
    ("*_size", AT_LEAST_ONE),  # codebook, vocab, block, held-out and reference set sizes
    ("*supersample", AT_LEAST_ONE),
    ("*dim", AT_LEAST_ONE),
    ("*channels", AT_LEAST_ONE),
    ("*width", AT_LEAST_ONE),
    ("*layers", AT_LEAST_ONE),
    ("gpt.n_*", AT_LEAST_ONE),
    ("*multiple_of", AT_LEAST_ONE),
    ("*norm_groups", AT_LEAST_ONE),
    ("*max_words", AT_LEAST_ONE),
    ("*max_tokens", AT_LEAST_ONE),
    ("*cls_token_num", AT_LEAST_ONE),
    ("*ch_mult", AT_LEAST_ONE),
    # rates, fractions, coefficients
    ("*lr", POSITIVE),
    ("*ema_decay", FRACTION),
    ("*_ratio", FRACTION),
    ("*dropout*", FRACTION),
    ("*context_noise", FRACTION),
    ("*betas", Range(0, 1, high_open=True)),
    ("sampling.top_p", Range(0, 1, low_open=True)),
    ("sampling.temperature", POSITIVE),
    ("sampling.cfg_scale", NON_NEGATIVE),
    ("*clip_eps", Range(0, 1, low_open=True, high_open=True)),
    ("*clip_eps_high", POSITIVE),  # the upper bound 1 + eps may pass 2
    ("*grad_clip", POSITIVE),
    ("collective_timeout", POSITIVE),
    ("*tau_start", POSITIVE),
    ("*tau_end", POSITIVE),
    ("*norm_eps", POSITIVE),
    ("*rope_base", POSITIVE),
    ("*ffn_dim_multiplier", POSITIVE),
    ("*weight_decay", NON_NEGATIVE),
    ("*_weight", NON_NEGATIVE),
    ("*kl_coef", NON_NEGATIVE),
    ("*commit_loss_beta", NON_NEGATIVE),
    ("*initializer_range", NON_NEGATIVE),
]


def domain_of(key: str) -> Range:
    """The allowed range of dotted config key `key`; a list item (`key[i]`) has its list's."""
    key = re.sub(r"(\[\d+\])+$", "", key)
    return next((domain for pattern, domain in DOMAINS if fnmatchcase(key, pattern)), ANY)


def check_value(key: str, value) -> None:
    """One line when number `value` of `key` is outside its domain (non-numbers pass)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    domain = domain_of(key)
    if value not in domain:
        raise UserError(f"config key '{key}' is {value!r}; allowed: {domain.describe()}")


def validate(cfg, prefix: str = "") -> None:
    """Check every number in config dataclass `cfg` (nested dataclasses, dicts and lists too)."""
    for field in dataclasses.fields(cfg):
        _check(prefix + field.name, getattr(cfg, field.name))


def _check(key: str, value) -> None:
    if dataclasses.is_dataclass(value):
        validate(value, key + ".")
    elif isinstance(value, dict):
        for name, item in value.items():
            _check(f"{key}.{name}", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check(f"{key}[{index}]", item)
    else:
        check_value(key, value)
