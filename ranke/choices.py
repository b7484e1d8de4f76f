"""The allowed values of every choice-valued setting, checked when a config is built (numbers:
`ranke.domains`, the same way).

`CHOICES` is a table of (dotted-key pattern, allowed values); the first pattern that matches a
key (`fnmatch`) gives its values. The values come from where each choice is acted on (the KL
anchors from `ranke.algo.grpo`, the precisions from `ranke.precision`, ...), so a new choice
there is a new allowed value here. A value outside them is refused with one line, e.g.

    config key 'posttrain.mode' is 'decoders'; allowed: one of policy, decoder, both, pixel, pixel_and_decoder
"""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatchcase

from ranke.algo.decoder import CONSISTENCY_SCHEDULES
from ranke.algo.grpo import KL_ANCHORS
from ranke.algo.policy_losses import POLICY_LOSSES
from ranke.algo.vqgan import RECONSTRUCTION_KINDS
from ranke.models.gpt import GPT_PRESETS
from ranke.models.perceptual import PERCEPTUAL_KINDS
from ranke.models.text import PADDING_SIDES, T5_DTYPES
from ranke.models.vq import VQ_PRESETS
from ranke.parallel import POLICY_SHARDINGS
from ranke.precision import REQUESTABLE
from ranke.runtime import UserError
from ranke.sampling import CFG_BELOW_ONE
from ranke.toy.data import SPLITS

BACKBONE_KINDS = ("toy", "llamagen", "janus")  # ranke.backbones.load_configured_backbone
TEXT_KINDS = ("toy", "t5")  # ranke.backbones.base.build_text_encoder
# policy: frozen-decoder GRPO; both: RankE; pixel: VA-π's pixel alignment of the policy, frozen
# decoder; pixel_and_decoder: VA-π's policy stage with RankE's decoder stage on its rollouts
POSTTRAIN_MODES = ("policy", "decoder", "both", "pixel", "pixel_and_decoder")
REFERENCES = ("frozen", "ema")  # the KL anchor's policy: a frozen copy of the start, or the EMA policy
SOFT_TOKEN_LOGITS = ("current", "rollout")
SOFT_TOKEN_CODEBOOKS = ("unit", "raw")

CHOICES: list[tuple[str, tuple[str, ...]]] = [
    ("precision", REQUESTABLE),
    ("backbone.kind", BACKBONE_KINDS),
    ("backbone.gpt_preset", tuple(GPT_PRESETS)),
    ("backbone.vq_preset", tuple(VQ_PRESETS)),
    ("text.kind", TEXT_KINDS),
    ("text.t5_dtype", tuple(T5_DTYPES)),
    ("text.padding", PADDING_SIDES),
    ("sampling.cfg_below_one", CFG_BELOW_ONE),
    ("*.recon_kind", RECONSTRUCTION_KINDS),
    ("*.perceptual", PERCEPTUAL_KINDS),
    ("posttrain.mode", POSTTRAIN_MODES),
    ("posttrain.reference", REFERENCES),
    ("posttrain.loss_type", tuple(POLICY_LOSSES)),
    ("posttrain.pixel_distance", RECONSTRUCTION_KINDS),
    ("posttrain.kl_kind", tuple(KL_ANCHORS)),
    ("posttrain.soft_token_logits", SOFT_TOKEN_LOGITS),
    ("posttrain.soft_token_codebook", SOFT_TOKEN_CODEBOOKS),
    ("posttrain.consistency_schedule", CONSISTENCY_SCHEDULES),
    ("posttrain.policy_sharding", POLICY_SHARDINGS),
    ("posttrain.eval_split", SPLITS),
]


def choices_of(key: str) -> tuple[str, ...] | None:
    """The allowed values of dotted config key `key`, or None when it is not a choice."""
    return next((allowed for pattern, allowed in CHOICES if fnmatchcase(key, pattern)), None)


def check_choices(cfg, prefix: str = "") -> None:
    """One line for the first choice-valued setting of config dataclass `cfg` (nested ones too)
    whose value is not one of its choices."""
    for field in dataclasses.fields(cfg):
        key, value = prefix + field.name, getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            check_choices(value, key + ".")
            continue
        allowed = choices_of(key)
        if allowed is not None and value not in allowed:
            raise UserError(f"config key '{key}' is {value!r}; allowed: one of {', '.join(allowed)}")
