"""Where a post-training run's prompts and real images come from (`ranke.data.PromptSource`)."""

from __future__ import annotations

import numpy as np

from ranke.config import RunConfig
from ranke.data import ImageCaptionSource, PromptSource, ToyPromptSource
from ranke.runtime import UserError


def build_prompt_source(cfg: RunConfig, image_size: int, rng: np.random.Generator) -> PromptSource:
    """`posttrain.data` (image-caption folder or tar shards, `ranke.data`), else the toy world
    (its training stream, or the toy-grammar prompt file `posttrain.prompts`)."""
    pcfg = cfg.posttrain
    if pcfg.data and pcfg.prompts:
        raise UserError("set either posttrain.data (image-caption data) or posttrain.prompts (toy prompts), not both")
    if pcfg.data:
        return ImageCaptionSource(pcfg.data, image_size, rng)
    if cfg.backbone.kind != "toy":
        raise UserError(f"backbone.kind={cfg.backbone.kind} needs posttrain.data (image-caption folder or .tar shards)")
    return ToyPromptSource(cfg.toy, pcfg.prompts, rng)
