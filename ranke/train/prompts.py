"""Where a post-training run's prompts and real images come from (`ranke.data.PromptSource`)."""

from __future__ import annotations

import numpy as np

from ranke.config import RunConfig
from ranke.data import ImageCaptionSource, PromptSource, ToyPromptSource, read_prompts
from ranke.runtime import UserError


def build_prompt_source(
    cfg: RunConfig, image_size: int, rng: np.random.Generator, given: list[str] | PromptSource | None = None
) -> PromptSource:
    """The prompts given from Python (`given`: a toy-grammar prompt list, or the user's own
    source), else `posttrain.data` (image-caption folder or tar shards, `ranke.data`), else the toy
    world (its training stream, or the toy-grammar prompt file `posttrain.prompts`)."""
    pcfg = cfg.posttrain
    if pcfg.data and pcfg.prompts:
        raise UserError("set either posttrain.data (image-caption data) or posttrain.prompts (toy prompts), not both")
    if given is not None and (pcfg.data or pcfg.prompts):
        raise UserError("prompts were given from Python and in posttrain.data / posttrain.prompts; give them one way")
    if given is not None and not isinstance(given, list):
        return given
    if pcfg.data:
        return ImageCaptionSource(pcfg.data, image_size, rng)
    if cfg.backbone.kind != "toy":
        what = "a prompt list has no real images" if given is not None else f"backbone.kind={cfg.backbone.kind} needs real images"
        raise UserError(f"{what}: give posttrain.data (image-caption folder or .tar shards) or a prompt source with images")
    if given is not None:
        return ToyPromptSource(cfg.toy, given, rng, origin="prompts given from Python")
    prompts = read_prompts(pcfg.prompts) if pcfg.prompts else None
    return ToyPromptSource(cfg.toy, prompts, rng, origin=f"prompt file '{pcfg.prompts}'")
