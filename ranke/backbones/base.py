"""The backbone interface every recipe talks to: encode prompts, sample tokens with CFG,
score tokens by teacher forcing, decode tokens to pixels.

A backbone bundles a frozen text encoder, an AR policy and a VQ tokenizer. Recipes pass the
policy / decoder to use explicitly (online or EMA copies), so the backbone itself holds no
training state. `ranke.backbones.toy`, `.llamagen` and `.janus` build one each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ranke.config import TextConfig
from ranke.models.gpt import GPTArgs, Transformer
from ranke.models.text import T5TextEncoder
from ranke.models.vq import VQArgs, VQModel, to_unit_range
from ranke.runtime import UserError
from ranke.sampling import SampleOutput, SamplingConfig, generate, token_logprobs
from ranke.toy.text import ToyTextEncoder


def build_text_encoder(cfg: TextConfig, device: torch.device | str = "cpu"):
    """The frozen text encoder named by the config (`toy` or `t5`)."""
    if cfg.kind == "toy":
        return ToyTextEncoder(cfg.dim, cfg.max_tokens, device, cfg.toy_encoding)
    if cfg.kind == "t5":
        if not cfg.path:
            raise UserError("text.kind=t5 needs text.path=<local flan-t5-xl directory>")
        from ranke.models.text import T5_DTYPES

        return T5TextEncoder(
            cfg.path, cfg.max_tokens, device, T5_DTYPES[cfg.t5_dtype], clean_captions=cfg.clean_captions, padding=cfg.padding
        )
    raise UserError(f"unknown text.kind '{cfg.kind}' (toy or t5)")


def check_compatible(gpt: GPTArgs, vq: VQArgs, text: TextConfig, image_size: int) -> None:
    """One clear line when the policy, tokenizer, text encoder and image size do not fit together."""
    grid = image_size // vq.downsample_factor
    if gpt.vocab_size != vq.codebook_size:
        raise UserError(f"gpt.vocab_size={gpt.vocab_size} must equal the tokenizer's codebook_size={vq.codebook_size}")
    if gpt.block_size != grid * grid:
        raise UserError(f"gpt.block_size={gpt.block_size} must be {grid * grid} ({grid}x{grid} tokens of {image_size}px)")
    if gpt.caption_dim != text.dim or gpt.cls_token_num != text.max_tokens:
        raise UserError(
            f"gpt expects text [{gpt.cls_token_num} x {gpt.caption_dim}] but the text encoder gives "
            f"[{text.max_tokens} x {text.dim}]: set text.max_tokens/text.dim or gpt.cls_token_num/gpt.caption_dim"
        )


@dataclass
class Backbone:
    text_encoder: object
    policy: Transformer
    tokenizer: VQModel

    @property
    def device(self) -> torch.device:
        return self.policy.tok_embeddings.weight.device

    @property
    def image_size(self) -> int:
        """Side of the generated images in pixels (token grid side x the tokenizer's downsampling)."""
        return self.policy.args.grid_size * self.tokenizer.args.downsample_factor

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        emb, mask = self.text_encoder.encode(list(prompts))
        return emb.to(self.device), mask.to(self.device)

    def sample(
        self,
        text_emb: torch.Tensor,
        text_mask: torch.Tensor,
        sampling: SamplingConfig,
        generator: torch.Generator,
        policy: Transformer | None = None,
        return_logprobs: bool = False,
        row_offset: int = 0,
        total_rows: int | None = None,
    ) -> SampleOutput:
        """Image tokens [B, N] for encoded prompts, drawn with the `sampling` settings (`generate_tokens`)."""
        return self.generate_tokens(
            policy or self.policy, text_emb, text_mask, sampling,
            generator=generator, return_logprobs=return_logprobs, row_offset=row_offset, total_rows=total_rows,
        )  # fmt: skip

    def generate_tokens(self, policy, text_emb, text_mask, sampling: SamplingConfig, **draw) -> SampleOutput:
        """The family's sampler: `ranke.sampling.generate` (CFG + KV cache) for LlamaGen-layout
        policies; `draw`: the generator and row split of `ranke.sampling.draw_image_tokens`."""
        return generate(policy, text_emb, text_mask, sampling, **draw)

    def token_logprobs(self, policy: Transformer, text_emb, text_mask, tokens, return_entropy: bool = False):
        """Teacher-forced log pi(z_t | z_<t, y) [B, N] of `tokens` (and entropies), differentiable."""
        return token_logprobs(policy, text_emb, text_mask, tokens, return_entropy=return_entropy)

    def token_logits(self, policy: Transformer, text_emb, text_mask, tokens) -> torch.Tensor:
        """Teacher-forced conditional logits [B, N, V] at every image position of `tokens`."""
        return policy(text_emb, tokens, text_mask)

    @torch.no_grad()
    def generate_images(self, prompts: list[str], sampling: SamplingConfig, generator: torch.Generator, batch_size: int):
        """Yield (prompts, images [b,3,H,W] in [0,1] on CPU) batch by batch, one image per prompt."""
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            emb, mask = self.encode_prompts(batch)
            yield batch, self.decode(self.sample(emb, mask, sampling, generator).tokens).cpu()

    def decode(self, tokens: torch.Tensor, decoder: VQModel | None = None) -> torch.Tensor:
        """Token sequences [B, N] -> images [B, 3, H, W] in [0, 1] (differentiable through the decoder)."""
        return to_unit_range((decoder or self.tokenizer).decode_codes(tokens))
