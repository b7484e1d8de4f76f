"""Toy CLIP: the toy world's contrastive image-text model, used as the training reward.

It plays the role CLIP ViT-L/14 plays in the paper (METHOD.md section 5): score = 100 x cosine
between an image embedding and a caption embedding, differentiable w.r.t. the pixels, so the
decoder stage's `L_reward` can backpropagate through it. A second toy CLIP (other seed and
width) reports the alignment score ("clip_score"), so that hacking the reward model shows up
as a gap between the two.

Image encoder: a small conv net. A 4x4 patchify stem keeps each patch's colour, stride-2 stages
go down to a 4x4 map, and the map is flattened (not pooled) into the embedding, so that where
things are survives: relations ("left of", "above") are part of what captions say.
Text encoder: word embeddings over the caption vocabulary read by a bidirectional GRU, which is
order-aware by construction: "a red circle left of a blue square" and its swapped twin get
different embeddings. (A 2-layer transformer with mean pooling, tried first at the same cost,
stayed close to a bag of words: it told "left of" from "right of" no better than chance.)
Training (symmetric InfoNCE with a learned temperature, hard negative captions) lives in
`ranke.train.judges`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ranke.assets import load_asset
from ranke.rewards.base import DualEncoderReward
from ranke.toy.captions import CONVERSE, VOCABULARY, CaptionSpec, caption_words, describe
from ranke.toy.scenes import COLORS, RELATIONS, SHAPES, SIZES, ObjectSpec

# Pixels in [0, 1] are mapped to [-1, 1] before the image encoder.
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)
PAD, UNK = 0, 1  # word ids; vocabulary words start at 2
WORD_IDS = {word: i + 2 for i, word in enumerate(VOCABULARY)}
ASSET_KIND = "toy_clip"


@dataclass
class ToyCLIPArgs:
    """Architecture of a toy CLIP (stored in its asset file)."""

    width: int = 32  # channels of the first image stage; stages have width x (1, 2, 4)
    depth: int = 1  # extra 3x3 convs per image stage
    text_width: int = 64  # GRU hidden size per direction
    text_layers: int = 1
    embed_dim: int = 64  # the shared embedding space
    max_words: int = 24  # toy captions have at most 17 tokens
    image_size: int = 64


def tokenize(prompts: list[str], max_words: int) -> torch.Tensor:
    """Word ids [B, L], right-padded with PAD to the longest caption (L <= max_words); unknown
    words are UNK; longer captions keep their first `max_words` tokens (as CLIP's tokenizer
    truncates). Padding never changes an embedding: the text encoder masks it out."""
    rows = [[WORD_IDS.get(word, UNK) for word in caption_words(prompt)[:max_words]] for prompt in prompts]
    ids = torch.full((len(prompts), max([1, *map(len, rows)])), PAD, dtype=torch.long)
    for row, words in enumerate(rows):
        ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
    return ids


def _conv_block(channels_in: int, channels_out: int, stride: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: the reward sees decoded images far from the training
    # distribution, and its output must not depend on running batch statistics.
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1),
        nn.GroupNorm(8, channels_out),
        nn.GELU(),
    )


class ImageEncoder(nn.Module):
    """Normalised pixels [B, 3, S, S] -> features [B, embed_dim] (S = image_size, a multiple of 32)."""

    def __init__(self, args: ToyCLIPArgs):
        super().__init__()
        widths = [args.width, 2 * args.width, 4 * args.width]
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, stride=4), nn.GroupNorm(8, widths[0]), nn.GELU()]
        channels = widths[0]
        for stage, width in enumerate(widths):
            if stage > 0:
                layers.append(_conv_block(channels, width, stride=2))
            layers += [_conv_block(width, width, stride=1) for _ in range(args.depth)]
            channels = width
        self.trunk = nn.Sequential(*layers)
        side = args.image_size // 16
        self.proj = nn.Linear(channels * side * side, args.embed_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(pixels).flatten(1))


class TextEncoder(nn.Module):
    """Word ids [B, T] (PAD-padded) -> features [B, embed_dim].

    A bidirectional GRU reads the words; its two final states (after the last word going
    forward, after the first word going backward) are concatenated and projected. Padding is
    skipped (packed sequences), so an embedding does not depend on the other captions of a batch.
    """

    def __init__(self, args: ToyCLIPArgs):
        super().__init__()
        self.words = nn.Embedding(len(VOCABULARY) + 2, args.text_width, padding_idx=PAD)
        self.rnn = nn.GRU(
            args.text_width, args.text_width, num_layers=args.text_layers, batch_first=True, bidirectional=True
        )
        self.proj = nn.Linear(2 * args.text_width, args.embed_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = (ids != PAD).sum(dim=1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.words(ids), lengths, batch_first=True, enforce_sorted=False)
        _, final = self.rnn(packed)  # [layers * 2, B, text_width]
        return self.proj(torch.cat([final[-2], final[-1]], dim=-1))


class ToyCLIP(nn.Module):
    """The dual encoder and its learned temperature (logit scale, as in CLIP: init 1/0.07)."""

    def __init__(self, args: ToyCLIPArgs):
        super().__init__()
        self.args = args
        self.image = ImageEncoder(args)
        self.text = TextEncoder(args)
        self.log_logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image(pixels)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text(ids)

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(log scale), capped at 100 as in CLIP so the logits cannot blow up."""
        return self.log_logit_scale.exp().clamp(max=100.0)


class ToyCLIPReward(DualEncoderReward):
    """Differentiable toy CLIP score `100 * cos` in [-100, 100] of images against prompts."""

    def __init__(self, model: ToyCLIP, device: str | torch.device = "cpu", name: str = "toy_clip"):
        self.model = model.to(device).eval().requires_grad_(False)
        super().__init__(
            name=name,
            image_size=model.args.image_size,
            image_mean=PIXEL_MEAN,
            image_std=PIXEL_STD,
            device=device,
            scale=100.0,
        )

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(tokenize(prompts, self.model.args.max_words).to(self.device))

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


def load_toy_clip(path: str | Path, device: str | torch.device = "cpu", name: str = "toy_clip") -> ToyCLIPReward:
    """The toy CLIP of an asset file (kind "toy_clip") as a reward named `name`."""
    args, state = load_asset(path, ASSET_KIND)
    model = ToyCLIP(ToyCLIPArgs(**args))
    model.load_state_dict(state)
    return ToyCLIPReward(model, device, name)


# --- hard negative captions --------------------------------------------------------------------

# Kinds of hard negatives and how often training draws each (among those that apply). In-batch
# negatives already teach colours, shapes and sizes; which object has which attribute (binding)
# and which way round a relation goes (order) are what a bag of words misses, so they are drawn
# more often.
HARD_NEGATIVE_WEIGHTS = {"color": 1.0, "shape": 1.0, "size": 1.0, "binding": 2.0, "relation": 1.0, "order": 3.0}
HARD_NEGATIVE_KINDS = tuple(HARD_NEGATIVE_WEIGHTS)
_ATTRIBUTE_VALUES = {"color": COLORS, "shape": SHAPES, "size": SIZES}
_AXIS = {"left of": "horizontal", "right of": "horizontal", "above": "vertical", "below": "vertical"}


def _replace(obj: ObjectSpec, attribute: str, value: str) -> ObjectSpec:
    fields = {"shape": obj.shape, "color": obj.color, "size": obj.size, attribute: value}
    return ObjectSpec(**fields)


def perturb_spec(spec: CaptionSpec, kind: str, rng: np.random.Generator) -> CaptionSpec | None:
    """A caption spec that differs from `spec` in one way, or None when `kind` cannot apply.

    color / shape / size: one object gets another value of that attribute;
    binding: two objects swap their colours or their shapes ("red circle, blue square" ->
    "blue circle, red square": the same words, bound differently);
    relation: the relation turns by 90 degrees ("left of" -> "above" or "below");
    order: the relation is reversed ("A left of B" -> "A right of B", i.e. "B left of A").
    The result never describes the same scenes as `spec` (canonical forms differ), so it is a
    true negative for every image of `spec`.
    """
    objects = list(spec.objects)
    if kind in _ATTRIBUTE_VALUES:
        index = int(rng.integers(len(objects)))
        current = getattr(objects[index], kind)
        others = [value for value in _ATTRIBUTE_VALUES[kind] if value != current]
        objects[index] = _replace(objects[index], kind, str(rng.choice(others)))
        candidate = CaptionSpec(tuple(objects), spec.relation)
    elif kind == "binding":
        if len(objects) < 2:
            return None
        first, second = rng.choice(len(objects), size=2, replace=False)
        attribute = str(rng.choice(["color", "shape"]))
        a, b = objects[first], objects[second]
        objects[first] = _replace(a, attribute, getattr(b, attribute))
        objects[second] = _replace(b, attribute, getattr(a, attribute))
        candidate = CaptionSpec(tuple(objects), spec.relation)
    elif kind in ("relation", "order"):
        if spec.relation is None:
            return None
        subject, name, other = spec.relation
        if kind == "order":
            new_name = CONVERSE[name]
        else:
            new_name = str(rng.choice([r for r in RELATIONS if _AXIS[r] != _AXIS[name]]))
        candidate = CaptionSpec(spec.objects, (subject, new_name, other))
    else:
        raise ValueError(f"unknown hard negative kind '{kind}' (one of {', '.join(HARD_NEGATIVE_KINDS)})")
    return candidate if candidate.canonical() != spec.canonical() else None


def hard_negative_caption(spec: CaptionSpec, rng: np.random.Generator, phrasing: int) -> tuple[str, CaptionSpec]:
    """One hard negative caption of `spec` in `phrasing`: its kind is drawn with
    HARD_NEGATIVE_WEIGHTS among the kinds that apply."""
    weights = np.array(list(HARD_NEGATIVE_WEIGHTS.values()))
    while True:
        kind = str(rng.choice(HARD_NEGATIVE_KINDS, p=weights / weights.sum()))
        negative = perturb_spec(spec, kind, rng)
        if negative is not None:
            return describe(negative, phrasing), negative
