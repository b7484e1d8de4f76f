"""Janus-Pro behind the backbone interface: the parts of `ranke.models.janus`, sampled by the
shared token loop through Janus' own CFG rows and KV cache, loaded from a local transformers Janus
directory.

Unconditional CFG rows are built as transformers' Janus `generate` builds them (`JanusPrompts.unconditional`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache, JanusForConditionalGeneration, JanusProcessor

from ranke.backbones.base import Backbone
from ranke.config import RunConfig
from ranke.models.janus import JanusDecoder, JanusPolicy, JanusPrompts, positions_from_mask
from ranke.runtime import UserError, read_user_json
from ranke.sampling import SampleOutput, SamplingConfig, draw_image_tokens, uses_guidance


@torch.no_grad()
def generate_janus(
    policy: JanusPolicy,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    uncond_input_ids: torch.Tensor,
    sampling: SamplingConfig,
    *,
    generator: torch.Generator,
    return_logprobs: bool = False,
    row_offset: int = 0,
    total_rows: int | None = None,
) -> SampleOutput:
    """Sample `policy.num_image_tokens` image tokens per prompt with the token loop of
    `ranke.sampling.generate` (`draw_image_tokens`: the same guidance switches, filters, draws and
    row split), on Janus' model: conditional and unconditional rows run as one batch through the
    language model's KV cache. Recorded `logprobs` are those of the conditional policy at
    temperature 1 without guidance or filtering, as `JanusPolicy.forward` recomputes them.
    """
    use_cfg = uses_guidance(sampling.cfg_scale, sampling.cfg_below_one)
    rows = torch.cat([input_ids, uncond_input_ids]) if use_cfg else input_ids
    mask = torch.cat([attention_mask, attention_mask]) if use_cfg else attention_mask
    positions = positions_from_mask(mask)
    cache = DynamicCache(config=policy.language_model.config)

    def next_logits(t: int, drawn: torch.Tensor) -> torch.Tensor:
        nonlocal mask
        if t == 0:
            return policy.image_logits(policy.hidden_states(policy.embed_prompt(rows), mask, positions, cache)[:, -1])
        last = drawn[:, -1]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step_embeds = policy.embed_image_tokens((torch.cat([last, last]) if use_cfg else last)[:, None])
        return policy.image_logits(policy.hidden_states(step_embeds, mask, positions[:, -1:] + t, cache)[:, -1])

    return draw_image_tokens(
        next_logits, input_ids.shape[0], policy.num_image_tokens, sampling, generator=generator,
        return_logprobs=return_logprobs, row_offset=row_offset, total_rows=total_rows,
    )  # fmt: skip


@dataclass
class JanusBackbone(Backbone):
    """`Backbone` over Janus-Pro: prompt encoding, teacher-forced scoring, decoding and batch
    generation are the base class's, on `JanusPrompts`, `JanusPolicy` and `JanusDecoder`;
    sampling steps are Janus' own (CFG rows from the prompt ids, KV cache of the language model)."""

    text_encoder: JanusPrompts
    policy: JanusPolicy
    tokenizer: JanusDecoder

    @property
    def device(self) -> torch.device:
        return self.policy.generation_head.vision_head.weight.device

    @property
    def image_size(self) -> int:
        return self.tokenizer.args.image_size

    def generate_tokens(self, policy: JanusPolicy, text_emb, text_mask, sampling: SamplingConfig, **draw) -> SampleOutput:
        """Image tokens for prompt ids `text_emb` [B, T] with mask `text_mask` (from `encode_prompts`)."""
        return generate_janus(policy, text_emb, text_mask, self.text_encoder.unconditional(text_emb), sampling, **draw)


def _check_janus_directory(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"no Janus model at '{path}' (no config.json): pass a local directory written by save_pretrained "
            "or downloaded from the hub (e.g. deepseek-community/Janus-Pro-1B)"
        )
    config = read_user_json(config_file, "Janus config")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "janus":
        raise UserError(
            f"'{path}' holds a '{model_type}' model, not a transformers Janus model (model_type 'janus'): "
            "use the transformers-format Janus-Pro checkpoint (e.g. deepseek-community/Janus-Pro-1B)"
        )
    if not (path / "tokenizer_config.json").is_file():
        raise UserError(f"'{path}' has no tokenizer: save the JanusProcessor next to the model (save_pretrained)")


def load_janus_backbone(
    model_path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    run_cfg: RunConfig | None = None,
) -> tuple[JanusBackbone, RunConfig]:
    """A `JanusBackbone` from a local transformers Janus directory (model + processor), in eval
    mode, and `run_cfg` (default: the defaults) as it is: the models' arguments are transformers'
    own config, not ranke's gpt / vq / text sections.

    Only the language model, the generation embeddings/aligner/head and the VQ model are kept
    and moved to `device`; the understanding tower and the text LM head are dropped.
    """
    path = Path(model_path)
    _check_janus_directory(path)
    processor = JanusProcessor.from_pretrained(path)
    if not processor.chat_template:
        raise UserError(f"the Janus processor in '{path}' has no chat template (chat_template.jinja/.json)")
    model = JanusForConditionalGeneration.from_pretrained(path, dtype=dtype)
    image_tokens = model.config.vision_config.num_image_tokens
    if image_tokens != model.config.vq_config.num_patches**2:
        raise UserError(
            f"'{path}': vision_config.num_image_tokens={image_tokens} does not match the VQ grid "
            f"{model.config.vq_config.num_patches}x{model.config.vq_config.num_patches}"
        )
    policy = JanusPolicy(model).to(device).eval()
    decoder = JanusDecoder(model.model.vqmodel).to(device).eval()
    return JanusBackbone(JanusPrompts(processor), policy, decoder), run_cfg or RunConfig()
