"""Sampling image tokens from the policy with classifier-free guidance, and teacher-forced scoring.

`generate` draws token sequences (CFG, temperature, top-k, top-p, KV cache, explicit generator);
`token_logprobs` scores given sequences with one differentiable forward. Both use the same model
code, so the log-probs `generate` records equal the ones `token_logprobs` recomputes (GRPO's
old/ref log-probs and its ratio are taken between these two).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ranke.models.gpt import Transformer
from ranke.runtime import UserError


@dataclass
class SampleOutput:
    """tokens [B, N] (int64); logprobs [B, N] float32: log pi(z_t | z_<t, y), conditional policy,
    temperature 1, no top-k/top-p, CFG not applied (None unless requested)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor | None = None


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance: l_u + s * (l_c - l_u)."""
    return uncond + cfg_scale * (cond - uncond)


CFG_BELOW_ONE = ("conditional", "mix")


def uses_guidance(cfg_scale: float, cfg_below_one: str = "conditional") -> bool:
    """Whether sampling runs unconditional rows at all. LlamaGen guides only when s > 1 (s <= 1
    samples the conditional policy, `conditional`); `mix` guides for every s != 1, so s < 1 moves
    toward the unconditional logits."""
    if cfg_below_one not in CFG_BELOW_ONE:
        raise UserError(f"sampling.cfg_below_one must be one of {', '.join(CFG_BELOW_ONE)}, got '{cfg_below_one}'")
    return cfg_scale > 1.0 if cfg_below_one == "conditional" else cfg_scale != 1.0


def guided_position(t: int, cfg_interval: int) -> bool:
    """LlamaGen's `cfg_interval`: image token t (0-based) is drawn from guided logits when
    t <= cfg_interval + 1 (the first token, then cfg_interval + 1 more), from the conditional
    logits after; -1 guides every token."""
    return cfg_interval < 0 or t <= cfg_interval + 1


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k, then outside the nucleus top-p, to -inf ([B, V], new tensor).

    top_k <= 0 or >= V and top_p >= 1 disable the filters. The nucleus is the smallest set of most
    likely tokens whose probability reaches top_p (the most likely token is always kept).
    """
    if 0 < top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        outside_sorted = mass_before >= top_p
        outside = torch.empty_like(outside_sorted).scatter_(-1, order, outside_sorted)
        logits = logits.masked_fill(outside, float("-inf"))
    return logits


def draw_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` [B, V] by inverse-CDF sampling with `uniforms` [B] in [0, 1).

    The token is the first whose cumulative probability exceeds u * total, so zero-probability
    (filtered) tokens are never drawn. Drawing from explicit uniforms, one per row, is what
    makes a row's token independent of the batch it sits in: a data-parallel rank that takes
    rows [a, b) of the global batch's uniforms draws exactly what one process would.
    """
    cumulative = probs.float().cumsum(dim=-1)
    targets = uniforms.to(cumulative.dtype)[:, None] * cumulative[:, -1:]
    return torch.searchsorted(cumulative, targets, right=True)[:, 0].clamp_max(probs.shape[-1] - 1)


def sample_next_tokens(
    logits: torch.Tensor, generator: torch.Generator, row_offset: int = 0, total_rows: int | None = None
) -> torch.Tensor:
    """Draw one token per row of (guided, tempered, filtered) `logits` [B, V]: `total_rows` uniforms
    from `generator` (default B), rows [row_offset, row_offset + B) of them used (`draw_tokens`)."""
    uniforms = torch.rand(logits.shape[0] if total_rows is None else total_rows, generator=generator, device=generator.device)
    return draw_tokens(logits.softmax(dim=-1), uniforms[row_offset : row_offset + logits.shape[0]])


def guided_sampling_step(
    logits: torch.Tensor,
    batch: int,
    cfg_scale: float,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator,
    row_offset: int = 0,
    total_rows: int | None = None,
    guide: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per caption from one step's logits [B or 2B, V] (conditional rows first, then the
    unconditional ones when CFG is on): guidance (unless `guide` is False: the conditional rows
    alone), temperature, top-k/top-p, the draw. Returns the tokens [B] and their log-probs [B]
    under the conditional policy at temperature 1, unfiltered."""
    cond = logits[:batch]
    step_logits = guided_logits(cond, logits[batch:], cfg_scale) if guide and logits.shape[0] > batch else cond
    step_logits = filter_logits(step_logits / temperature, top_k, top_p)
    next_token = sample_next_tokens(step_logits, generator, row_offset, total_rows)
    return next_token, cond.log_softmax(dim=-1).gather(-1, next_token[:, None])[:, 0]


def check_sampling_settings(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature > 0:
        raise UserError(f"sampling temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise UserError(f"sampling top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"sampling top_p must be in (0, 1] (1 disables it), got {top_p}")


def _activation_dtype(model: Transformer) -> torch.dtype:
    """dtype of keys/values: the autocast dtype when autocast is on, else the weights' dtype."""
    weight = model.tok_embeddings.weight
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def generate(
    model: Transformer,
    text_emb: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    *,
    cfg_scale: float,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_interval: int = -1,
    cfg_below_one: str = "conditional",
    generator: torch.Generator,
    return_logprobs: bool = False,
    use_kv_cache: bool = True,
    row_offset: int = 0,
    total_rows: int | None = None,
) -> SampleOutput:
    """Sample `block_size` image tokens per caption (text_emb [B, T, C], left-padded, text_mask [B, T]).

    Each step: guided logits l_u + s * (l_c - l_u) (the unconditional rows use the model's
    uncond_embedding with the same text mask; none when `uses_guidance` says no: s <= 1 by
    default, as LlamaGen; the conditional logits alone after `cfg_interval`, `guided_position`),
    divided by temperature, top-k then top-p filtered, and drawn by `draw_tokens` with one uniform
    per row from `generator` (on the model's device). The generator alone decides the draws, so a
    given seed gives the same tokens with and without the KV cache. `use_kv_cache=False`
    recomputes the full sequence at every step (slow; the reference the cache is tested against).

    Data parallelism: each step draws `total_rows` uniforms (default: this batch) and this batch
    uses those of rows [row_offset, row_offset + B), so ranks holding consecutive slices of a
    global batch, each with the same generator state, sample what one process would.

    `logprobs` (when return_logprobs) are log pi_theta(z_t | z_<t, y) of the sampled tokens under
    the CONDITIONAL policy at temperature 1 without filtering or guidance: the quantity GRPO's
    old/ref log-probs stand for, equal to `token_logprobs(model, text_emb, text_mask, tokens)`.
    """
    check_sampling_settings(temperature, top_k, top_p)
    batch, num_tokens = text_emb.shape[0], model.args.block_size
    total_rows = batch if total_rows is None else total_rows
    if not 0 <= row_offset <= total_rows - batch:
        raise ValueError(f"rows [{row_offset}, {row_offset + batch}) are not inside the {total_rows} global rows")
    use_cfg = uses_guidance(cfg_scale, cfg_below_one)
    with torch.inference_mode():
        rows_text, rows_mask = text_emb, text_mask
        if use_cfg:
            uncond = model.cls_embedding.uncond_embedding.to(text_emb.dtype).expand_as(text_emb)
            rows_text = torch.cat([text_emb, uncond])
            rows_mask = None if text_mask is None else torch.cat([text_mask, text_mask])
        tokens = torch.empty(batch, num_tokens, dtype=torch.long, device=text_emb.device)
        logprobs = torch.empty(batch, num_tokens, device=text_emb.device) if return_logprobs else None

        if use_kv_cache:
            cache = model.new_cache(rows_text.shape[0], _activation_dtype(model))
            logits = model.prefill(rows_text, rows_mask, cache)
        for t in range(num_tokens):
            if not use_kv_cache:
                so_far = tokens[:, :t]
                logits = model.next_token_logits(rows_text, torch.cat([so_far, so_far]) if use_cfg else so_far, rows_mask)
            next_token, next_logprob = guided_sampling_step(
                logits, batch, cfg_scale, temperature, top_k, top_p, generator, row_offset, total_rows,
                guide=guided_position(t, cfg_interval),
            )  # fmt: skip
            tokens[:, t] = next_token
            if logprobs is not None:
                logprobs[:, t] = next_logprob
            if use_kv_cache and t + 1 < num_tokens:
                logits = model.decode_step(torch.cat([next_token, next_token]) if use_cfg else next_token, cache)
    # clones are ordinary tensors: inference tensors cannot be saved for a later backward pass
    return SampleOutput(tokens.clone(), None if logprobs is None else logprobs.clone())


def token_logprobs(
    model: Transformer,
    text_emb: torch.Tensor,
    text_mask: torch.Tensor | None,
    tokens: torch.Tensor,
    *,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log pi_theta(z_t | z_<t, y) [B, N] of `tokens` [B, N], one forward, differentiable.

    The conditional policy at temperature 1, no dropout of any kind (whatever the module's mode):
    exactly what `generate(..., return_logprobs=True)` records. With `return_entropy`, also the
    entropy [B, N] of each step's full distribution.
    """
    log_probs = model(text_emb, tokens, text_mask).log_softmax(dim=-1)
    chosen = log_probs.gather(-1, tokens[..., None])[..., 0]
    if not return_entropy:
        return chosen
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return chosen, entropy
