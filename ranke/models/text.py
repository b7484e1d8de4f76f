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
