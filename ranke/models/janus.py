"""Janus-Pro's text-to-image parts, on transformers' native Janus classes.

A Janus-Pro checkpoint (`JanusForConditionalGeneration`) holds a SigLIP understanding tower, a
Llama language model, a VQ tokenizer (`JanusVQVAE`, LlamaGen VQ-16 layout) and the image
generation parts: `generation_embeddings` + `generation_aligner` (an image token -> an LM input
vector) and `generation_head` (an LM hidden state -> image-token logits). Text-to-image generation
uses only the language model, the generation parts and the VQ decoder:

    prompt -> chat template + image-start token -> LM -> generation_head -> image token z_1
    z_1 -> generation_embeddings -> generation_aligner -> LM (KV cache) -> ... -> z_N
    z -> VQ codebook (unit-norm codes) -> post_quant_conv -> decoder -> image in [-1, 1]

with N = (image_size / 16)^2 (576 tokens of 384 px for Janus-Pro 1B/7B). This module keeps those
parts and drops the understanding tower and the text LM head:

* `JanusPrompts` formats and tokenizes prompts (the backbone's `text_encoder`);
* `JanusPolicy` holds what the policy stage trains (language model, generation embeddings,
  aligner, head); its `forward(input_ids, tokens, attention_mask)` gives teacher-forced
  image-token logits, so `ranke.sampling.token_logprobs` scores it like the toy policy;
* `JanusDecoder` wraps the VQ model with the `VQModel` interface the decoder stage uses;

`ranke.backbones.janus` puts them behind the backbone interface with Janus' own sampler.

Unconditional CFG rows are built as transformers' Janus `generate` builds them: every prompt
token except BOS and the image-start token is replaced by the pad token, with the same attention
mask. Positions follow the attention mask, so left-padded prompts get the positions they would
have unpadded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, JanusForConditionalGeneration, JanusProcessor, JanusVQVAE

from ranke.runtime import UserError


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] counting only attended tokens, so left padding does not shift them."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


class JanusPrompts:
    """Prompts -> chat-formatted token ids ending with the image-start token, left padded.

    Each prompt becomes the user turn of a one-turn conversation rendered by the processor's chat
    template with the assistant prefix (`add_generation_prompt`); the processor in image mode
    appends the image-start token. This is Janus-Pro's text-to-image prompt format.
    """

    def __init__(self, processor: JanusProcessor):
        tokenizer = processor.tokenizer
        self.processor = processor
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.image_start_id = tokenizer.convert_tokens_to_ids(processor.image_start_token)
        if None in (self.bos_id, self.pad_id, self.image_start_id):
            raise UserError("the Janus tokenizer must define a BOS token, a pad token and the image-start token")

    def format(self, prompt: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [B, T] int64, attention_mask [B, T] int64), left padded."""
        batch = self.processor(
            text=[self.format(prompt) for prompt in prompts], generation_mode="image", padding=True, return_tensors="pt"
        )
        return batch["input_ids"], batch["attention_mask"]

    def unconditional(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The CFG rows: every token but BOS and the image-start token replaced by the pad token."""
        keep = (input_ids == self.bos_id) | (input_ids == self.image_start_id)
        return input_ids.masked_fill(~keep, self.pad_id)


class JanusPolicy(nn.Module):
    """The trainable image-generation path of Janus: language model + generation embeddings,
    aligner and head. The modules are those of the loaded model, not copies."""

    def __init__(self, model: JanusForConditionalGeneration):
        super().__init__()
        janus = model.model
        self.language_model = janus.language_model
        self.generation_embeddings = janus.generation_embeddings
        self.generation_aligner = janus.generation_aligner
        self.generation_head = janus.generation_head
        self.num_image_tokens = janus.vqmodel.config.num_patches**2

    def enable_gradient_checkpointing(self) -> None:
        """transformers' per-layer checkpointing of the language model. Its layers recompute only in
        train mode, so the language model is put there; Janus-Pro's LM has no dropout
        (attention_dropout 0), so the mode changes nothing else."""
        self.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.language_model.train()

    def transformer_blocks(self) -> nn.ModuleList:
        """The language model's decoder layers: the units FSDP shards one at a time (ranke.parallel)."""
        return self.language_model.layers

    def embed_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)

    def embed_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, n] -> LM input vectors [B, n, D]."""
        return self.generation_aligner(self.generation_embeddings(tokens))

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM hidden states [..., D] -> image-token logits [..., V] in float32 (log-prob precision)."""
        return self.generation_head(hidden).float()

    def hidden_states(self, embeds, attention_mask, position_ids, cache: DynamicCache | None = None) -> torch.Tensor:
        """Last-layer LM hidden states [B, T, D] of `embeds` (appended to `cache` when given)."""
        output = self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return output.last_hidden_state

    def forward(self, input_ids: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, N, V] of image tokens [B, N] after the prompts [B, T], one forward.

        Position t's logits come from the hidden state of the input before z_t: the last prompt
        token (the image-start token) for z_1, the embedded z_{t-1} after that.
        """
        embeds = torch.cat([self.embed_prompt(input_ids), self.embed_image_tokens(tokens[:, :-1])], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(tokens.shape[0], tokens.shape[1] - 1)], dim=1)
        hidden = self.hidden_states(embeds, mask, positions_from_mask(mask))
        return self.image_logits(hidden[:, input_ids.shape[1] - 1 :])


@dataclass
class JanusDecoderArgs:
    """Sizes of a Janus VQ model (`codebook_size` is what evaluation reads, like `VQArgs`)."""

    codebook_size: int
    codebook_embed_dim: int
    grid_size: int  # tokens per image side: 24 for Janus-Pro
    image_size: int  # pixels per side: 384 for Janus-Pro


class JanusDecoder(nn.Module):
    """transformers' `JanusVQVAE` with the `ranke.models.vq.VQModel` interface, images in [-1, 1].

    Codes are unit vectors, as in Janus' VQ-16: `JanusVQVAE.decode` normalises codebook entries,
    and `encode_codes` looks up the nearest code by cosine similarity of the unit-normalised
    encoder output, as the released Janus tokenizer quantizes (transformers' `encode` searches
    the raw codebook instead). The decoder and `post_quant_conv` are made trainable (transformers
    only puts the VQ model in eval mode; it has no dropout, so the mode does not matter); the
    encoder, `quant_conv` and codebook are frozen so the token space never moves.
    """

    def __init__(self, vq: JanusVQVAE):
        super().__init__()
        self.vq = vq
        config = vq.config
        upsampling = 2 ** (len(config.channel_multiplier) - 1)
        self.args = JanusDecoderArgs(
            config.num_embeddings, config.embed_dim, config.num_patches, config.num_patches * upsampling
        )
        self.gradient_checkpointing = False
        self.freeze_token_space()
        for parameter in self.decoder_parameters():
            parameter.requires_grad_(True)

    def codebook_vectors(self) -> torch.Tensor:
        """The unit-norm code vectors used for decoding, [codebook_size, embed_dim]."""
        return F.normalize(self.vq.quantize.embedding.weight, dim=-1)

    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> codes [B, h, w] (int64)."""
        z = F.normalize(self.vq.quant_conv(self.vq.encoder(x)), dim=1)
        return torch.einsum("bdhw,kd->bhwk", z, self.codebook_vectors()).argmax(dim=-1)

    def codebook_entries(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w], or token sequences [B, h*w], -> code vectors [B, d, h, w]."""
        side = self.args.grid_size
        if codes.shape[1:].numel() != side * side:
            raise ValueError(f"expected {side}x{side} = {side * side} codes per image, got shape {list(codes.shape)}")
        return self.codebook_vectors()[codes.reshape(-1, side, side)].permute(0, 3, 1, 2)

    def decode(self, code_vectors: torch.Tensor) -> torch.Tensor:
        """Code vectors [B, d, h, w] (hard or soft mixtures of codes) -> images [B, 3, H, W] (float32)."""
        features = self.vq.post_quant_conv(code_vectors)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.vq.decoder, features, use_reentrant=False).float()
        return self.vq.decoder(features).float()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the decoder in backward. transformers' Janus VQ decoder has no per-block
        switch, so the whole decoder is one segment: the decoder stage's several decodes no
        longer keep their activations at the same time."""
        self.gradient_checkpointing = True

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] or [B, h*w] -> images [B, 3, H, W] in [-1, 1] (unclamped)."""
        return self.decode(self.codebook_entries(codes))

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv (for the adaptive GAN weight)."""
        return self.vq.decoder.conv_out.weight

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of `post_quant_conv` and the decoder: all that RankE's decoder stage trains."""
        return [*self.vq.post_quant_conv.parameters(), *self.vq.decoder.parameters()]

    def freeze_token_space(self) -> None:
        """Stop gradients into the encoder, `quant_conv` and codebook, so codes keep their meaning."""
        for module in (self.vq.encoder, self.vq.quant_conv, self.vq.quantize):
            module.requires_grad_(False)
