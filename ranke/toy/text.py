"""The toy world's frozen text encoder: a caption's meaning as fixed one-hot blocks.

It stands in for T5 in the toy world: a frozen encoder that already understands the language.
Each text position owns a disjoint block of dimensions, so any mix of positions keeps everything
readable: a plain average (LlamaGen's zero rotary factor on text positions, `gpt.zero_text_rotary`)
as well as the content-based attention of the toy policy, which leaves text positions unrotated:

    position 0        number of objects (3 one-hot) + relation (4 one-hot, or "none")
    position 1 + i    object i: colour (6) + shape (4) + size (2) + role (4) one-hots

An object's role is where the caption puts it relative to the other object ("A left of B": A's
role is "left of", B's "right of"; no bits without a relation). Like T5's contextual token
embeddings, each object position thus carries what the sentence says about it, so placing an
object needs only its own position's features (relations read from the summary alone were
learned by some SFT runs and not others; docs/benchmarks.md).

Phrasings that name the objects in the same order encode identically; slots follow the caption's
order, so the converse phrasing of a relation ("a B to the right of a A") fills the object slots
the other way round and names the converse relation (the roles stay with their objects).
Output convention as the T5 encoder: left padding (the `1 + number of objects` real positions
sit at the end), zeros elsewhere.
"""

from __future__ import annotations

import torch

from ranke.runtime import UserError
from ranke.toy.captions import CONVERSE, parse_caption
from ranke.toy.scenes import COLORS, RELATIONS, SHAPES, SIZES

ENCODING_VERSION = 2  # 1: no object roles (policy assets before 2026-11-29)
MAX_OBJECTS = 3
SUMMARY_WIDTH = MAX_OBJECTS + len(RELATIONS) + 1
OBJECT_WIDTH = len(COLORS) + len(SHAPES) + len(SIZES) + len(RELATIONS)
ENCODED_WIDTH = SUMMARY_WIDTH + MAX_OBJECTS * OBJECT_WIDTH


class ToyTextEncoder:
    """Captions of the toy grammar -> (emb [B, max_tokens, dim], mask [B, max_tokens]), left-padded."""

    def __init__(self, dim: int, max_tokens: int, device: torch.device | str = "cpu", version: int = ENCODING_VERSION):
        if version != ENCODING_VERSION:
            raise UserError(
                f"this policy was trained with toy text encoding v{version}, this version of ranke encodes "
                f"v{ENCODING_VERSION} (object roles): retrain it with `ranke sft`"
            )
        if dim < ENCODED_WIDTH:
            raise UserError(f"text.dim={dim} is too small for the toy text encoder (needs >= {ENCODED_WIDTH})")
        if max_tokens < 1 + MAX_OBJECTS:
            raise UserError(f"text.max_tokens={max_tokens} is too small for the toy text encoder (needs >= 4)")
        self.dim = dim
        self.max_tokens = max_tokens
        self.device = torch.device(device)

    def encode_one(self, prompt: str) -> torch.Tensor:
        """The real positions [1 + number of objects, dim] of one caption."""
        try:
            spec = parse_caption(prompt)
        except ValueError as err:
            raise UserError(f"the toy text encoder reads toy-grammar captions only; '{prompt}': {err}") from None
        rows = torch.zeros(1 + len(spec.objects), self.dim)
        rows[0, len(spec.objects) - 1] = 1
        relation = MAX_OBJECTS + (RELATIONS.index(spec.relation[1]) if spec.relation else len(RELATIONS))
        rows[0, relation] = 1
        roles = {}
        if spec.relation:
            subject, name, other = spec.relation
            roles = {subject: name, other: CONVERSE[name]}
        for i, obj in enumerate(spec.objects):
            block = SUMMARY_WIDTH + i * OBJECT_WIDTH
            rows[1 + i, block + COLORS.index(obj.color)] = 1
            rows[1 + i, block + len(COLORS) + SHAPES.index(obj.shape)] = 1
            rows[1 + i, block + len(COLORS) + len(SHAPES) + SIZES.index(obj.size)] = 1
            if i in roles:
                rows[1 + i, block + len(COLORS) + len(SHAPES) + len(SIZES) + RELATIONS.index(roles[i])] = 1
        return rows

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.zeros(len(prompts), self.max_tokens, self.dim)
        mask = torch.zeros(len(prompts), self.max_tokens, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            rows = self.encode_one(prompt)
            emb[row, self.max_tokens - len(rows) :] = rows
            mask[row, self.max_tokens - len(rows) :] = True
        return emb.to(self.device), mask.to(self.device)
