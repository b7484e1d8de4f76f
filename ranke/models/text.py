"""Frozen text encoders that turn prompts into the policy's caption embeddings.

Both encoders return `(emb [B, max_tokens, dim], mask [B, max_tokens] bool)` in LlamaGen's t2i
sampling convention: LEFT padding. A caption of n tokens fills the last n positions (in order),
`mask` is True exactly there, and the n-1..0 positions before them hold zeros. The last text
position is then always a real token, which matters because it predicts the first image token.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn as nn

from ranke.runtime import UserError


def left_pad(emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move right-padded tokens (valid prefix of each row, emb [B, T, C], mask [B, T]) to the end
    of the row and zero everything else; returns (emb, bool mask) in the left-padded convention."""
    batch, length = mask.shape
    counts = mask.long().sum(dim=1, keepdim=True)  # [B, 1]
    positions = torch.arange(length, device=mask.device).expand(batch, length)
    # output slot i holds input token i - (T - n) (a rotation by n, as LlamaGen's sampler does)
    source = (positions + counts) % length
    shifted = emb.gather(1, source[..., None].expand(-1, -1, emb.shape[-1]))
    left_mask = positions >= length - counts
    return shifted * left_mask[..., None].to(emb.dtype), left_mask


class T5TextEncoder:
    """flan-t5-xl (or any T5 encoder) from a LOCAL directory, frozen, LlamaGen's caption embeddings.

    Prompts are lower-cased and stripped (LlamaGen's sampler additionally runs a caption-cleaning
    pass for web text: URLs, HTML, odd punctuation), tokenized to `max_length` tokens with
    truncation (the tokenizer's end token `</s>` is counted and kept), encoded with the padding
    masked, then left-padded with zeros (see module docstring).
    """

    def __init__(
        self,
        path: str | Path,
        max_length: int = 120,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import AutoTokenizer, T5EncoderModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(
                f"T5 encoder directory '{path}' not found or has no config.json; "
                "download flan-t5-xl once and pass its local directory"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load a T5 encoder from '{path}': {str(err).splitlines()[0]}") from None
        self.tokenizer.padding_side = "right"  # left_pad below expects the valid tokens first
        self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.max_tokens = max_length
        self.dim = self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(emb [B, max_tokens, dim] in the model's dtype, mask [B, max_tokens] bool), left-padded."""
        batch = self.tokenizer(
            [prompt.lower().strip() for prompt in prompts],
            max_length=self.max_tokens,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return left_pad(hidden, batch.attention_mask)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """Fixed Transformer position codes [length, dim]: sin/cos pairs at geometric frequencies."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    freqs = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freqs)
    table[:, 1::2] = torch.cos(position * freqs)[:, : dim // 2]
    return table.float()


class ToyTextEncoder(nn.Module):
    """The toy world's frozen text encoder: a seeded word table plus sinusoidal word positions.

    Word j of a caption (counted from its first word) is `words[id] + positions[j]`; the position
    codes are needed because the policy's text positions carry no rotary information, so a bag of
    words could not tell "a red circle left of a blue square" from its colour-swapped twin.
    Tokens are lower-case words and single punctuation marks (a final "." is dropped); words
    outside `vocabulary` map to `<unk>`; captions longer than `max_tokens` keep their first
    `max_tokens` tokens. Output convention as T5TextEncoder (left padding, zeros, bool mask).
    """

    UNK = "<unk>"

    def __init__(self, vocabulary: list[str], dim: int, max_tokens: int, seed: int = 0):
        super().__init__()
        words = [word.lower() for word in vocabulary]
        if len(set(words)) != len(words) or self.UNK in words:
            raise UserError("toy text vocabulary must hold distinct words and no '<unk>'")
        self.index = {word: i + 1 for i, word in enumerate(words)}  # 0 is <unk>
        self.dim = dim
        self.max_tokens = max_tokens
        generator = torch.Generator().manual_seed(seed)
        # unit-variance entries: the same scale as the position codes
        self.register_buffer("words", torch.randn(len(words) + 1, dim, generator=generator), persistent=False)
        self.register_buffer("positions", sinusoidal_positions(max_tokens, dim), persistent=False)
        self.requires_grad_(False)

    def tokenize(self, prompt: str) -> list[int]:
        """Word ids of one prompt (0 = <unk>), truncated to max_tokens."""
        text = prompt.strip().lower().removesuffix(".")
        return [self.index.get(token, 0) for token in re.findall(r"\w+|[^\w\s]", text)][: self.max_tokens]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(emb [B, max_tokens, dim] float32, mask [B, max_tokens] bool), left-padded."""
        device = self.words.device
        ids = torch.zeros(len(prompts), self.max_tokens, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_tokens, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            tokens = self.tokenize(prompt)
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = True
        ids, mask = ids.to(device), mask.to(device)
        emb = self.words[ids] + self.positions  # right-padded, positions counted from the first word
        return left_pad(emb, mask)
