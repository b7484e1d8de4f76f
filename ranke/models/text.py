"""Frozen text encoders that turn prompts into the policy's caption embeddings.

Text encoders (this T5 wrapper, and the toy world's `ranke.toy.text.ToyTextEncoder`) return `(emb [B, max_tokens, dim], mask [B, max_tokens] bool)` in LlamaGen's t2i
sampling convention: LEFT padding. A caption of n tokens fills the last n positions (in order),
`mask` is True exactly there, and the n-1..0 positions before them hold zeros. The last text
position is then always a real token, which matters because it predicts the first image token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ranke.runtime import UserError

PADDING_SIDES = ("left", "right")
T5_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


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

    Prompts are cleaned as LlamaGen cleans them (`clean_captions`, `ranke.models.caption_cleaning`)
    or only lower-cased and stripped, tokenized to `max_length` tokens with truncation (the
    tokenizer's end token `</s>` is counted and kept), encoded with the padding masked, then
    left-padded with zeros (see module docstring), as LlamaGen's samplers feed its policy.
    `padding="right"` returns the encoder output as T5 gives it (valid tokens first, the encoder's
    own outputs at the masked pad positions), as the RankE release post-trains LlamaGen.
    LlamaGen runs T5 in bf16 by default (`dtype`); the embeddings come back as float32 either way.
    """

    def __init__(
        self,
        path: str | Path,
        max_length: int = 120,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        clean_captions: bool = False,
        padding: str = "left",
    ):
        from transformers import AutoTokenizer, T5EncoderModel

        if padding not in PADDING_SIDES:
            raise UserError(f"text.padding must be one of {', '.join(PADDING_SIDES)}, got '{padding}'")
        if clean_captions:
            from ranke.models.caption_cleaning import clean_caption

            clean_caption("")  # fail now, with the install line, when ftfy / bs4 are missing

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
        self.tokenizer.padding_side = "right"  # valid tokens first, as T5 reads them; left_pad moves them
        self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.max_tokens = max_length
        self.dim = self.model.config.d_model
        self.clean_captions = clean_captions
        self.padding = padding

    def preprocess(self, prompt: str) -> str:
        if self.clean_captions:
            from ranke.models.caption_cleaning import clean_caption

            return clean_caption(prompt)
        return prompt.lower().strip()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(emb [B, max_tokens, dim] float32, mask [B, max_tokens] bool), padded on `padding`'s side."""
        batch = self.tokenizer(
            [self.preprocess(prompt) for prompt in prompts],
            max_length=self.max_tokens,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        hidden = hidden.float()  # bf16 T5's values, exactly, in the float32 the policy reads
        if self.padding == "right":
            return hidden, batch.attention_mask.bool()
        return left_pad(hidden, batch.attention_mask)
