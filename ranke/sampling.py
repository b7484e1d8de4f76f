"""Sampling image tokens from the policy with classifier-free guidance, and teacher-forced scoring.

`generate` draws token sequences (CFG, temperature, top-k, top-p, KV cache, explicit generator);
`token_logprobs` scores given sequences with one differentiable forward. Both use the same model
code, so the log-probs `generate` records equal the ones `token_logprobs` recomputes (GRPO's
old/ref log-probs and its ratio are taken between these two).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ranke.models.gpt import Transformer
from ranke.runtime import UserError


@dataclass
class SamplingConfig:
    """The sampler's settings (`RunConfig.sampling`), defaults the toy world's. The LlamaGen and
    Janus presets (configs/*.yaml) set their own (cfg 6 / 5, top-k 1000)."""

    cfg_scale: float = 3.0
    temperature: float = 1.0
    # 16 of the toy's 256 codes, the share of LlamaGen's top-k 1000 of 16384; +0.02-0.03 verifier
    # accuracy over no top-k for every toy policy measured (docs/benchmarks.md)
    top_k: int = 16
    top_p: float = 1.0
    # LlamaGen's generate: guidance for the first cfg_interval + 2 tokens only, conditional after; -1: all
    cfg_interval: int = -1
    # scale <= 1: `conditional` samples the conditional logits alone (LlamaGen guides only above 1);
    # `mix` applies l_u + s (l_c - l_u) for every s != 1
    cfg_below_one: str = "conditional"


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
    """One token per row of `probs` [B, V] by inverse-CDF sampling with `uniforms` [B] in [0, 1)
    (k tokens per row, [B, k], from `uniforms` [B, k]).

    The token is the first whose cumulative probability exceeds u * total, so zero-probability
    (filtered) tokens are never drawn. Drawing from explicit uniforms, one per row, is what
    makes a row's token independent of the batch it sits in: a data-parallel rank that takes
    rows [a, b) of the global batch's uniforms draws exactly what one process would.
    """
    cumulative = probs.float().cumsum(dim=-1)
    per_row = uniforms.to(cumulative.dtype).reshape(uniforms.shape[0], -1)  # [B, k]
    drawn = torch.searchsorted(cumulative, per_row * cumulative[:, -1:], right=True).clamp_max(probs.shape[-1] - 1)
    return drawn.reshape(uniforms.shape)


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
    sampling: SamplingConfig,
    generator: torch.Generator,
    *,
    row_offset: int = 0,
    total_rows: int | None = None,
    guide: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per caption from one step's logits [B or 2B, V] (conditional rows first, then the
    unconditional ones when CFG is on): guidance (unless `guide` is False: the conditional rows
    alone), temperature, top-k/top-p, the draw. Returns the tokens [B] and their log-probs [B]
    under the conditional policy at temperature 1, unfiltered."""
    cond = logits[:batch]
    step_logits = guided_logits(cond, logits[batch:], sampling.cfg_scale) if guide and logits.shape[0] > batch else cond
    step_logits = filter_logits(step_logits / sampling.temperature, sampling.top_k, sampling.top_p)
    next_token = sample_next_tokens(step_logits, generator, row_offset, total_rows)
    return next_token, cond.log_softmax(dim=-1).gather(-1, next_token[:, None])[:, 0]


def check_sampling(sampling: SamplingConfig) -> None:
    """One clear line for settings the sampler cannot use."""
    if not sampling.temperature > 0:
        raise UserError(f"sampling temperature must be > 0, got {sampling.temperature}")
    if sampling.top_k < 0:
        raise UserError(f"sampling top_k must be >= 0 (0 disables it), got {sampling.top_k}")
    if not 0 < sampling.top_p <= 1:
        raise UserError(f"sampling top_p must be in (0, 1] (1 disables it), got {sampling.top_p}")
    uses_guidance(sampling.cfg_scale, sampling.cfg_below_one)  # checks cfg_below_one


# next_logits(t, drawn): the logits [B or 2B, V] of image position t given the tokens `drawn` [B, t]
# before it (conditional rows, then the unconditional ones when guided); a family's model behind it
NextLogits = Callable[[int, torch.Tensor], torch.Tensor]


def draw_image_tokens(
    next_logits: NextLogits,
    batch: int,
    num_tokens: int,
    sampling: SamplingConfig,
    *,
    generator: torch.Generator,
    return_logprobs: bool = False,
    row_offset: int = 0,
    total_rows: int | None = None,
) -> SampleOutput:
    """The token loop every family samples with: `num_tokens` image tokens for each of `batch`
    captions, token t drawn by `guided_sampling_step` from `next_logits(t, tokens before t)`,
    guided at the positions `guided_position` names.

    Data parallelism: each step draws `total_rows` uniforms (default: this batch) and this batch
    uses those of rows [row_offset, row_offset + B), so ranks holding consecutive slices of a
    global batch, each with the same generator state, sample what one process would.
    """
    check_sampling(sampling)
    total_rows = batch if total_rows is None else total_rows
    if not 0 <= row_offset <= total_rows - batch:
        raise ValueError(f"rows [{row_offset}, {row_offset + batch}) are not inside the {total_rows} global rows")
    tokens = torch.empty(batch, num_tokens, dtype=torch.long, device=generator.device)
    logprobs = torch.empty(batch, num_tokens, device=generator.device) if return_logprobs else None
    for t in range(num_tokens):
        next_token, next_logprob = guided_sampling_step(
            next_logits(t, tokens[:, :t]), batch, sampling, generator, row_offset=row_offset, total_rows=total_rows,
            guide=guided_position(t, sampling.cfg_interval),
        )  # fmt: skip
        tokens[:, t] = next_token
        if logprobs is not None:
            logprobs[:, t] = next_logprob
    return SampleOutput(tokens, logprobs)


def _activation_dtype(model: Transformer) -> torch.dtype:
    """dtype of keys/values: the autocast dtype when autocast is on, else the weights' dtype."""
    weight = model.tok_embeddings.weight
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def generate(
    model: Transformer,
    text_emb: torch.Tensor,
    text_mask: torch.Tensor | None,
    sampling: SamplingConfig,
    *,
    generator: torch.Generator,
    return_logprobs: bool = False,
    use_kv_cache: bool = True,
    row_offset: int = 0,
    total_rows: int | None = None,
) -> SampleOutput:
    """Sample `block_size` image tokens per caption (text_emb [B, T, C], left-padded, text_mask [B, T])
    with the `sampling` settings (`draw_image_tokens`, which also says how `row_offset` and
    `total_rows` split a global batch).

    Each step: guided logits l_u + s * (l_c - l_u) (the unconditional rows use the model's
    uncond_embedding with the same text mask; none when `uses_guidance` says no: s <= 1 by
    default, as LlamaGen; the conditional logits alone after `cfg_interval`, `guided_position`),
    divided by temperature, top-k then top-p filtered, and drawn by `draw_tokens` with one uniform
    per row from `generator` (on the model's device). The generator alone decides the draws, so a
    given seed gives the same tokens with and without the KV cache. `use_kv_cache=False`
    recomputes the full sequence at every step (slow; the reference the cache is tested against).

    `logprobs` (when return_logprobs) are log pi_theta(z_t | z_<t, y) of the sampled tokens under
    the CONDITIONAL policy at temperature 1 without filtering or guidance: the quantity GRPO's
    old/ref log-probs stand for, equal to `token_logprobs(model, text_emb, text_mask, tokens)`.
    """
    use_cfg = uses_guidance(sampling.cfg_scale, sampling.cfg_below_one)
    with torch.inference_mode():
        rows_text, rows_mask = text_emb, text_mask
        if use_cfg:
            uncond = model.cls_embedding.uncond_embedding.to(text_emb.dtype).expand_as(text_emb)
            rows_text = torch.cat([text_emb, uncond])
            rows_mask = None if text_mask is None else torch.cat([text_mask, text_mask])
        cache = None

        def next_logits(t: int, drawn: torch.Tensor) -> torch.Tensor:
            nonlocal cache
            if not use_kv_cache:
                return model.next_token_logits(rows_text, torch.cat([drawn, drawn]) if use_cfg else drawn, rows_mask)
            if t == 0:
                cache = model.new_cache(rows_text.shape[0], _activation_dtype(model))
                return model.prefill(rows_text, rows_mask, cache)
            last = drawn[:, -1]
            return model.decode_step(torch.cat([last, last]) if use_cfg else last, cache)

        out = draw_image_tokens(
            next_logits, text_emb.shape[0], model.args.block_size, sampling, generator=generator,
            return_logprobs=return_logprobs, row_offset=row_offset, total_rows=total_rows,
        )  # fmt: skip
    # clones are ordinary tensors: inference tensors cannot be saved for a later backward pass
    return SampleOutput(out.tokens.clone(), None if out.logprobs is None else out.logprobs.clone())


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
    chosen = chosen_logprobs(log_probs, tokens)
    return (chosen, entropies(log_probs)) if return_entropy else chosen


def chosen_logprobs(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The log-probs [B, N] of `tokens` [B, N] in per-position log-distributions `log_probs` [B, N, V]."""
    return log_probs.gather(-1, tokens[..., None])[..., 0]


def entropies(log_probs: torch.Tensor) -> torch.Tensor:
    """The entropy [B, N] of each per-position log-distribution of `log_probs` [B, N, V]."""
    return -(log_probs.exp() * log_probs).sum(dim=-1)
