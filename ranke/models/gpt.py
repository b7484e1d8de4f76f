"""The AR policy: a LlamaGen text-to-image GPT (Llama-style decoder) with its exact parameter layout.

Sequence layout (LlamaGen t2i): `cls_token_num` projected text embeddings, then the image tokens
in raster order. The logits for image token t come from position `cls_token_num - 1 + t`, so the
last text position predicts the first image token.

Positions: 2D rotary embeddings over the image grid. Text positions get LlamaGen's "zero rotation":
its table holds cos = sin = 0 there, so queries and keys of text positions are multiplied by ZERO
(not left unrotated). Every query therefore gives all visible text keys the same score 0: attention
to the caption is a uniform average of its values. Official checkpoints were trained this way.
The toy preset turns this off (`zero_text_rotary=False`): text positions are left unrotated, so
image tokens attend to caption positions by content, which the small toy policy learns much faster.

Text padding: captions are left-padded (valid tokens at the end, zeros before them) and an optional
`text_mask` [B, cls_token_num] (True = valid) hides padded text positions as keys; each position
still sees itself so no attention row is empty. CFG's unconditional rows reuse the caption's mask.

Train/eval hygiene: dropout and caption dropout happen only when explicitly asked for
(`forward(..., dropout=True, caption_dropout=True)`, supervised training); `module.train()` changes
nothing, so RL log-probs are computed by the very same function that samples.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ranke.runtime import UserError


@dataclass(frozen=True)
class GPTArgs:
    """Hyperparameters of the policy (field names follow LlamaGen's ModelArgs)."""

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: as many KV heads as query heads
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    caption_dim: int = 2048  # width of the text encoder's embeddings
    cls_token_num: int = 120  # number of text positions
    class_dropout_prob: float = 0.1  # caption dropout (for CFG), supervised training only
    vocab_size: int = 16384  # VQ codebook size
    block_size: int = 256  # number of image tokens, a square grid
    # LlamaGen zeroes queries and keys of text positions (official checkpoints need it); False leaves
    # them unrotated instead, so image tokens can attend to caption positions by content.
    zero_text_rotary: bool = True

    def __post_init__(self):
        if self.dim % self.n_head:
            raise UserError(f"gpt: dim={self.dim} is not divisible by n_head={self.n_head}")
        if self.head_dim % 4:
            raise UserError(f"gpt: head size {self.head_dim} must be a multiple of 4 for 2D rotary embeddings")
        if self.n_head % self.kv_heads:
            raise UserError(f"gpt: n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise UserError(f"gpt: block_size={self.block_size} is not a square number of image tokens")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden_dim(self) -> int:
        """LlamaGen's SwiGLU width: 2/3 of 4*dim, optionally scaled, rounded up to `multiple_of`."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)


_T2I = dict(cls_token_num=120, caption_dim=2048, vocab_size=16384, block_size=256)

GPT_PRESETS: dict[str, GPTArgs] = {
    "GPT-B": GPTArgs(n_layer=12, n_head=12, dim=768, **_T2I),  # 111M
    "GPT-L": GPTArgs(n_layer=24, n_head=16, dim=1024, **_T2I),  # 343M
    "GPT-XL": GPTArgs(n_layer=36, n_head=20, dim=1280, **_T2I),  # 775M
    "GPT-XXL": GPTArgs(n_layer=48, n_head=24, dim=1536, **_T2I),  # 1.4B
    # 64x64 toy images through a 8x downsampling VQ: 8x8 tokens; 4 text positions of the toy text
    # encoder (ranke.toy.text). Sized so SFT fits ~30 min on 2 CPU cores. The toy data stream is
    # unbounded, so only caption dropout (needed for CFG) is kept; vocab_size is the toy codebook size.
    # Unrotated text positions: with LlamaGen's zero rotation the caption-conditional part of the
    # SFT loss on object tokens grew 3x more slowly (600-step runs, docs/benchmarks.md). Six layers
    # rather than four: fewer steps in the same time but better multi-object scenes.
    "toy": GPTArgs(
        n_layer=6, n_head=6, dim=192, cls_token_num=4, caption_dim=64, vocab_size=256, block_size=64,
        token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, zero_text_rotary=False,
    ),
}


def preset_args(name: str, **overrides) -> GPTArgs:
    """GPT_PRESETS[name] with some fields replaced (e.g. vocab_size=the toy codebook size)."""
    if name not in GPT_PRESETS:
        raise UserError(f"unknown GPT preset '{name}'; choose one of {', '.join(GPT_PRESETS)}")
    return replace(GPT_PRESETS[name], **overrides)


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - n % k


# ----------------------------------------------------------------------------- rotary embeddings


def rotary_table(args: GPTArgs) -> torch.Tensor:
    """Unit rotations e^(i*angle) per position and pair, [cls_token_num + block_size, head_dim // 2], complex128.

    Image token t = row * grid + col rotates its first head_dim/4 pairs by row * f_i and the
    other head_dim/4 pairs by col * f_i, f_i = rope_base ** (-2i / (head_dim / 2)). Text positions
    hold 0 (LlamaGen's cos = sin = 0), i.e. their queries and keys are zeroed, or 1 (no rotation)
    when `zero_text_rotary` is off.
    """
    half = args.head_dim // 2
    freqs = 1.0 / (args.rope_base ** (torch.arange(0, half, 2, dtype=torch.float64, device="cpu") / half))
    axis = torch.outer(torch.arange(args.grid_size, dtype=torch.float64, device="cpu"), freqs)  # [grid, half/2]
    grid = args.grid_size
    angles = torch.cat([axis[:, None, :].expand(grid, grid, -1), axis[None, :, :].expand(grid, grid, -1)], dim=-1)
    image = torch.polar(torch.ones_like(angles), angles).flatten(0, 1)  # [grid*grid, half]
    text_rotation = 0.0 if args.zero_text_rotary else 1.0
    text = torch.full((args.cls_token_num, half), text_rotation, dtype=torch.complex128, device="cpu")
    return torch.cat([text, image])


def apply_rotary(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [B, S, H, D], read as complex numbers, by
    multiplying them with rotations [S, D/2] (complex64, or complex128 for float64 models).
    Computed in the rotations' precision and cast back to x's dtype."""
    pairs = torch.view_as_complex(x.to(rotations.real.dtype).unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotations[None, :, None, :]).flatten(-2).type_as(x)


# ----------------------------------------------------------------------------- attention masks and cache


def key_padding(text_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Which keys are visible, [B, seq_len] bool: valid text positions and every image position."""
    visible = torch.ones(text_mask.shape[0], seq_len, dtype=torch.bool, device=text_mask.device)
    visible[:, : text_mask.shape[1]] = text_mask.bool()
    return visible


def padded_causal_mask(visible: torch.Tensor) -> torch.Tensor:
    """Attention mask [B, 1, S, S] (True = attend): causal, padded keys hidden, diagonal always on."""
    seq_len = visible.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=visible.device).tril()
    diagonal = torch.eye(seq_len, dtype=torch.bool, device=visible.device)
    return (causal & visible[:, None, None, :]) | diagonal


class KVCache:
    """Keys and values of every layer, allocated once: [n_layer, B, n_kv_head, max_len, head_dim].

    A plain object (not a module), so it never appears in a state dict. `length` counts the
    positions written so far; `visible` [B, max_len] is the key padding mask when the caption has one.
    """

    def __init__(self, args: GPTArgs, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (args.n_layer, batch_size, args.kv_heads, args.cls_token_num + args.block_size, args.head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0
        self.visible: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, S, D] at positions length..length+S; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel; like LlamaGen it normalises bf16 inputs in float32, then scales
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class CaptionMLP(nn.Module):
    """Projects text-encoder embeddings to the model width: fc1 -> GELU(tanh) -> fc2, no biases."""

    def __init__(self, caption_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(caption_dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Text conditioning. `uncond_embedding` is the "empty caption" used by CFG's unconditional rows
    and by caption dropout; like LlamaGen it is a fixed random buffer (saved, never trained)."""

    def __init__(self, args: GPTArgs):
        super().__init__()
        uncond = torch.randn(args.cls_token_num, args.caption_dim) / args.caption_dim**0.5
        self.register_buffer("uncond_embedding", uncond)
        self.cap_proj = CaptionMLP(args.caption_dim, args.dim)
        self.dropout_prob = args.class_dropout_prob

    def forward(self, text_emb: torch.Tensor, caption_dropout: bool | torch.Tensor = False) -> torch.Tensor:
        """`caption_dropout=True` drops each caption with probability `class_dropout_prob`; a bool
        tensor [B] names the rows to drop (drawn by a recipe for a batch split over processes)."""
        if torch.is_tensor(caption_dropout):
            dropped = caption_dropout
        elif caption_dropout and self.dropout_prob > 0:
            dropped = torch.rand(text_emb.shape[0], device=text_emb.device) < self.dropout_prob
        else:
            return self.cap_proj(text_emb)
        text_emb = torch.where(dropped[:, None, None], self.uncond_embedding.to(text_emb.dtype), text_emb)
        return self.cap_proj(text_emb)


class Attention(nn.Module):
    def __init__(self, args: GPTArgs):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.kv_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_head + 2 * args.kv_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        self.attn_dropout_p = args.attn_dropout_p
        self.resid_dropout_p = args.resid_dropout_p

    def forward(self, x, rotations, mask, cache: KVCache | None, layer: int, dropout: bool) -> torch.Tensor:
        batch, seq_len, dim = x.shape
        qk_dim = dim + self.n_kv_head * self.head_dim
        qkv = self.wqkv(x)
        # queries and keys are adjacent in the fused projection: rotate both with one kernel
        qk = apply_rotary(qkv[..., :qk_dim].unflatten(-1, (-1, self.head_dim)), rotations)
        q, k = qk.transpose(1, 2).split([self.n_head, self.n_kv_head], dim=1)
        v = qkv[..., qk_dim:].unflatten(-1, (self.n_kv_head, self.head_dim)).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # Sequences are processed from position 0 (full forward, prefill) or one token at a time
        # (decode): without a padding mask the former is plain causal, the latter sees every key.
        # PyTorch's fused CPU attention has a slow bf16 backward (~3x the math path at 68 positions,
        # a 1.5x slower toy SFT step; in fp32 it is the faster one; docs/benchmarks.md), so bf16
        # whole-sequence passes on a CPU take the math path, with and without gradients alike
        # (log-probs scored for RL equal those of the training pass); one-token decode steps keep
        # the fused kernel, faster there.
        bf16_sequence_on_cpu = q.device.type == "cpu" and q.dtype != torch.float32 and seq_len > 1
        with sdpa_kernel(SDPBackend.MATH) if bf16_sequence_on_cpu else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                is_causal=mask is None and seq_len > 1,
                dropout_p=self.attn_dropout_p if dropout else 0.0,
                enable_gqa=self.n_kv_head != self.n_head,
            )
        out = self.wo(out.transpose(1, 2).reshape(batch, seq_len, dim))
        return F.dropout(out, self.resid_dropout_p, training=dropout)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: GPTArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_hidden_dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_hidden_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_hidden_dim, args.dim, bias=False)
        self.ffn_dropout_p = args.ffn_dropout_p

    def forward(self, x: torch.Tensor, dropout: bool) -> torch.Tensor:
        return F.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)), self.ffn_dropout_p, training=dropout)


class TransformerBlock(nn.Module):
    def __init__(self, args: GPTArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rotations, mask, cache: KVCache | None, layer: int, dropout: bool) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rotations, mask, cache, layer, dropout)
        return h + self.feed_forward(self.ffn_norm(h), dropout)


class Transformer(nn.Module):
    """LlamaGen t2i GPT. Its state dict matches the official checkpoints key for key."""

    def __init__(self, args: GPTArgs):
        super().__init__()
        self.args = args
        self.cls_embedding = CaptionEmbedder(args)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # A plain attribute, not a buffer: kept out of the state dict and never cast to bf16 by .to().
        self.rope = rotary_table(args)
        # Training forwards recompute each block in backward instead of keeping its activations.
        self.gradient_checkpointing = False
        self.initialize_weights()

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def transformer_blocks(self) -> nn.ModuleList:
        """The repeated blocks: the units FSDP shards one at a time (ranke.parallel)."""
        return self.layers

    def initialize_weights(self) -> None:
        """LlamaGen init: N(0, initializer_range) for linears and embeddings, zero output head."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.args.initializer_range)
        nn.init.zeros_(self.output.weight)

    # -- pieces shared by teacher forcing and sampling

    def _rotations(self, start: int, length: int, dtype: torch.dtype) -> torch.Tensor:
        device = self.tok_embeddings.weight.device
        if self.rope.device != device:
            self.rope = self.rope.to(device)
        return self.rope[start : start + length].to(torch.complex128 if dtype == torch.float64 else torch.complex64)

    def _run_layers(self, x, start: int, mask, cache: KVCache | None, dropout: bool = False) -> torch.Tensor:
        rotations = self._rotations(start, x.shape[1], x.dtype)
        recompute = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            if recompute:
                x = checkpoint(layer, x, rotations, mask, None, index, dropout, use_reentrant=False)
            else:
                x = layer(x, rotations, mask, cache, index, dropout)
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x)

    def _embed_text(self, text_emb: torch.Tensor, caption_dropout: bool | torch.Tensor = False) -> torch.Tensor:
        # the residual stream keeps the weights' dtype (under autocast the projection returns bf16),
        # so prefill and teacher forcing compute the text positions identically
        return self.cls_embedding(text_emb, caption_dropout).to(self.tok_embeddings.weight.dtype)

    def _check_text(self, text_emb: torch.Tensor, text_mask: torch.Tensor | None) -> None:
        expected = (self.args.cls_token_num, self.args.caption_dim)
        if text_emb.dim() != 3 or tuple(text_emb.shape[1:]) != expected:
            raise ValueError(f"text_emb must be [B, {expected[0]}, {expected[1]}], got {list(text_emb.shape)}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text_emb.shape[:2]):
            raise ValueError(f"text_mask must be {list(text_emb.shape[:2])}, got {list(text_mask.shape)}")

    def hidden_states(
        self,
        text_emb: torch.Tensor,
        image_tokens: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        *,
        caption_dropout: bool | torch.Tensor = False,
        dropout: bool = False,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T + n, dim] of the full sequence [text, image_tokens [B, n]]."""
        self._check_text(text_emb, text_mask)
        if image_tokens.shape[1] >= self.args.block_size:
            raise ValueError(f"at most {self.args.block_size - 1} input image tokens, got {image_tokens.shape[1]}")
        x = torch.cat([self._embed_text(text_emb, caption_dropout), self.tok_embeddings(image_tokens)], dim=1)
        x = F.dropout(x, self.args.token_dropout_p, training=dropout)
        mask = None if text_mask is None else padded_causal_mask(key_padding(text_mask, x.shape[1]))
        return self._run_layers(x, 0, mask, None, dropout)

    # -- public API

    def forward(
        self,
        text_emb: torch.Tensor,
        tokens: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        *,
        caption_dropout: bool | torch.Tensor = False,
        dropout: bool = False,
    ) -> torch.Tensor:
        """Teacher-forced logits [B, N, vocab] (float32) for image tokens [B, N].

        Logits for token t are predicted from text and tokens < t. `caption_dropout` replaces whole
        captions by the unconditional embedding with probability class_dropout_prob (or the rows of
        a bool tensor [B]); `dropout` enables the dropout layers. Both are for supervised training only.
        """
        hidden = self.hidden_states(
            text_emb, tokens[:, :-1], text_mask, caption_dropout=caption_dropout, dropout=dropout
        )
        return self.output(hidden[:, self.args.cls_token_num - 1 :]).float()

    def next_token_logits(
        self, text_emb: torch.Tensor, tokens: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, vocab] of the next image token after `tokens` [B, n], by a full forward."""
        return self.output(self.hidden_states(text_emb, tokens, text_mask)[:, -1]).float()

    def new_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for `batch_size` rows (dtype: that of the activations)."""
        weight = self.tok_embeddings.weight
        return KVCache(self.args, batch_size, weight.device, dtype or weight.dtype)

    def prefill(self, text_emb: torch.Tensor, text_mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Run the text positions into an empty cache; return the first image token's logits [B, vocab]."""
        self._check_text(text_emb, text_mask)
        if cache.length:
            raise ValueError("prefill needs an empty cache")
        mask = None
        if text_mask is not None:
            cache.visible = key_padding(text_mask, cache.keys.shape[3])
            mask = padded_causal_mask(cache.visible[:, : text_emb.shape[1]])
        hidden = self._run_layers(self._embed_text(text_emb), 0, mask, cache)
        return self.output(hidden[:, -1]).float()

    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append image tokens [B] at position cache.length; return the next token's logits [B, vocab]."""
        start = cache.length
        mask = None if cache.visible is None else cache.visible[:, None, None, : start + 1]
        hidden = self._run_layers(self.tok_embeddings(tokens[:, None]), start, mask, cache)
        return self.output(hidden[:, -1]).float()
