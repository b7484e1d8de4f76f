"""Whether and how a recipe continues an existing run directory.

* A run that holds checkpoints is continued only with `--resume` (otherwise one line, and the
  run's files stay as they are: the recipe writes its config.yaml only after this check).
* On resume the newest intact checkpoint is loaded (`ranke.checkpoint.load_latest_checkpoint`).
* Settings that the restored state fixes (the seed and data streams, architectures, starting
  models, mode, optimizer moments' hyperparameters, the precision) cannot change on resume: a
  change is refused with one line, and `precision=auto` takes the run's own. Learning rates can:
  the recipe sets them into the restored optimizers (`set_learning_rate`), so config.yaml always
  says what trains.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ranke import config as config_lib
from ranke.runtime import UserError
from ranke import checkpoint as checkpoint_lib

# Config keys (dotted; a section name covers all its keys) that a resumed run must keep.
FIXED_ON_RESUME = {
    "tokenizer": (
        "seed", "precision", "toy", "vq", "tokenizer.betas", "tokenizer.weight_decay", "tokenizer.disc_channels",
        "tokenizer.disc_layers",
    ),
    "sft": ("seed", "precision", "toy", "gpt", "text", "sft.tokenizer", "sft.betas", "sft.weight_decay"),
    "posttrain": (
        "objects", "seed", "precision", "toy", "backbone", "posttrain.mode", "posttrain.policy", "posttrain.tokenizer", "posttrain.prompts",
        "posttrain.data", "posttrain.reference", "posttrain.rewards", "posttrain.policy_weight_decay",
        "posttrain.decoder_weight_decay", "posttrain.disc_channels", "posttrain.disc_layers",
        "posttrain.policy_sharding", "posttrain.lora",
    ),
}  # fmt: skip


MISSING = object()  # a key a config mapping does not hold


def _value_at(data: dict, key: str):
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return MISSING
        data = data[part]
    return data


# why a key is fixed, where the general reason does not say enough
RESUME_HINTS = {
    "objects": "the run was given these Python objects (ranke.api); resume it from Python with the same ones",
}


def check_unchanged(cfg, saved_config_yaml: str, section: str) -> None:
    """Refuse a resume whose config changes a key of FIXED_ON_RESUME[section]; a key the run's
    config.yaml lacks (written before the key existed) counts as its default."""
    saved = yaml.safe_load(saved_config_yaml) or {}
    current = yaml.safe_load(yaml.safe_dump(config_lib.to_dict(cfg)))
    defaults = yaml.safe_load(yaml.safe_dump(config_lib.to_dict(type(cfg)())))
    for key in FIXED_ON_RESUME[section]:
        before = _value_at(saved, key)
        before = _value_at(defaults, key) if before is MISSING else before
        now = _value_at(current, key)
        if before != now:
            hint = RESUME_HINTS.get(key, "the restored state fixes it; resume with the run's setting or start a new --out")
            raise UserError(f"--resume cannot change {key} (the run has {before!r}, now {now!r}): {hint}")


def resume_point(run: Path, cfg, section: str, resume: bool) -> tuple[Path, tuple[dict, dict, str]] | None:
    """The checkpoint to continue from (its path and contents), or None for a fresh run."""
    if checkpoint_lib.latest_checkpoint(run) is None:
        return None
    if not resume:
        raise UserError(f"{run} already holds checkpoints; pass --resume to continue it, or choose a new --out")
    found = checkpoint_lib.load_latest_checkpoint(run)
    saved_precision = (yaml.safe_load(found[1][2]) or {}).get("precision")
    if cfg.precision == "auto" and saved_precision:  # a resumed run keeps the arithmetic it started with
        cfg.precision = saved_precision
    check_unchanged(cfg, found[1][2], section)
    return found


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, schedule=None) -> None:
    """Put the configured learning rate into a restored optimizer; with a LambdaLR `schedule`,
    `lr` becomes its base rate and the current factor of the schedule is kept."""
    if schedule is None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        return
    schedule.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, schedule.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(schedule.last_epoch)
