"""Splits of the toy world: an unbounded seeded training stream, a fixed held-out prompt set
(the toy "COCO-30K") and a fixed set of real reference images for Frechet distance.

Each split draws scenes from its own seed, so the splits never share random draws; captions of
single objects can still coincide across splits (there are only 4 x 6 x 2 of them), as prompts
do between COCO's splits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ranke.toy.captions import NUM_PHRASINGS, CaptionSpec, caption_for, parse_caption
from ranke.toy.render import render_scene, render_scenes
from ranke.toy.scenes import Scene, sample_scene, scene_from_spec


@dataclass(frozen=True)
class ToyConfig:
    """The toy world's data settings (frozen: safe as a shared default argument)."""

    image_size: int = 64
    heldout_size: int = 2000
    heldout_seed: int = 1_000_003
    reference_size: int = 2000
    reference_seed: int = 2_000_003
    # prompts for choosing settings (sweeps, presets): never the held-out evaluation prompts
    validation_size: int = 2000
    validation_seed: int = 3_000_003
    supersample: int = 4  # anti-aliasing samples per pixel side when rendering


def sample_training_pair(rng: np.random.Generator) -> tuple[Scene, str]:
    """The next (scene, caption) of the training stream; the caption has a random phrasing.
    Samples are drawn one after the other, so batch boundaries do not change the stream."""
    scene = sample_scene(rng)
    return scene, caption_for(scene, int(rng.integers(NUM_PHRASINGS)))


def train_batch(rng: np.random.Generator, batch_size: int, cfg: ToyConfig = ToyConfig()):
    """A batch of the training stream: (images float32 [B, 3, H, W] in [0, 1], captions, scenes)."""
    pairs = [sample_training_pair(rng) for _ in range(batch_size)]
    scenes = [scene for scene, _ in pairs]
    captions = [caption for _, caption in pairs]
    images = render_scenes(scenes, cfg.image_size, cfg.supersample)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return tensor, captions, scenes


@functools.lru_cache(maxsize=8)
def _heldout(size: int, seed: int) -> tuple[tuple[Scene, ...], tuple[str, ...]]:
    rng = np.random.default_rng(seed)
    pairs = [sample_training_pair(rng) for _ in range(size)]
    return tuple(scene for scene, _ in pairs), tuple(caption for _, caption in pairs)


def heldout_scenes(cfg: ToyConfig = ToyConfig()) -> list[Scene]:
    """The fixed held-out scenes (the same on every call and machine; drawn like the training
    stream from their own seed, so a smaller heldout_size gives a prefix)."""
    return split_scenes_and_prompts("heldout", cfg)[0]


def heldout_prompts(cfg: ToyConfig = ToyConfig()) -> list[str]:
    """The fixed held-out prompts: one caption per held-out scene."""
    return split_scenes_and_prompts("heldout", cfg)[1]


SPLITS = ("heldout", "validation")


def split_scenes_and_prompts(split: str, cfg: ToyConfig = ToyConfig()) -> tuple[list[Scene], list[str]]:
    """The scenes and prompts of a fixed split: `heldout` (evaluation, the toy COCO-30K) or
    `validation` (drawn the same way from its own seed, for choosing settings without touching
    the evaluation prompts)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (one of: {', '.join(SPLITS)})")
    size, seed = (cfg.heldout_size, cfg.heldout_seed) if split == "heldout" else (cfg.validation_size, cfg.validation_seed)
    scenes, prompts = _heldout(size, seed)
    return list(scenes), list(prompts)


@functools.lru_cache(maxsize=4)
def _reference(size: int, seed: int, n: int, supersample: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = render_scenes([sample_scene(rng) for _ in range(n)], size, supersample)
    images.setflags(write=False)
    return images


def reference_images(cfg: ToyConfig = ToyConfig(), n: int | None = None) -> np.ndarray:
    """The first `n` (default `cfg.reference_size`) real images of the fixed reference stream,
    uint8 [n, H, W, 3]; read-only (a cached array); a smaller n gives a prefix of a larger one."""
    count = cfg.reference_size if n is None else n
    return _reference(cfg.image_size, cfg.reference_seed, count, cfg.supersample)


def scene_for_caption(caption: str | CaptionSpec, rng: np.random.Generator) -> Scene:
    """A random scene that satisfies a caption (ValueError if the caption is not of the grammar)."""
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    return scene_from_spec(spec.objects, spec.relation, rng)


def render_caption(caption: str | CaptionSpec, rng: np.random.Generator, cfg: ToyConfig = ToyConfig()) -> np.ndarray:
    """A real image for a caption: a random scene satisfying it, rendered as uint8 [H, W, 3]."""
    return render_scene(scene_for_caption(caption, rng), cfg.image_size, cfg.supersample)

