"""LlamaGen behind the backbone interface: its official GPT and VQ checkpoints, flan-t5 text."""

from __future__ import annotations

import dataclasses

import torch

from ranke.backbones.base import Backbone, build_text_encoder, check_compatible
from ranke.config import RunConfig
from ranke.models.gpt import GPT_PRESETS, Transformer
from ranke.models.load import load_into, read_state_dict
from ranke.models.vq import VQ_PRESETS, VQModel
from ranke.runtime import UserError

# Buffers some LlamaGen checkpoints carry that are not weights (KV caches set up for sampling).
GPT_IGNORED_KEYS = ("*.kv_cache.k_cache", "*.kv_cache.v_cache", "freqs_cis", "causal_mask")


def load_llamagen_backbone(run_cfg: RunConfig, device: torch.device | str = "cpu") -> tuple[Backbone, RunConfig]:
    """LlamaGen from its official files: GPT (`backbone.gpt_ckpt`), VQ (`backbone.vq_ckpt`),
    flan-t5 (`backbone.t5_path`); and `run_cfg` with the models' own arguments (gpt, vq, text).

    Weights load strictly with weights_only unpickling (KV-cache buffers some files carry are
    ignored); the policy's token grid follows `image_size` (the GPT weights do not depend on it).
    """
    cfg, text = run_cfg.backbone, run_cfg.text
    for key in ("gpt_ckpt", "vq_ckpt", "t5_path"):
        if not getattr(cfg, key):
            raise UserError(f"backbone.kind=llamagen needs backbone.{key} (a local file or directory)")
    if cfg.gpt_preset not in GPT_PRESETS or cfg.vq_preset not in VQ_PRESETS:
        raise UserError(
            f"unknown preset gpt '{cfg.gpt_preset}' / vq '{cfg.vq_preset}' "
            f"(GPT: {', '.join(GPT_PRESETS)}; VQ: {', '.join(VQ_PRESETS)})"
        )
    vq_args = VQ_PRESETS[cfg.vq_preset]
    grid = cfg.image_size // vq_args.downsample_factor
    if grid * vq_args.downsample_factor != cfg.image_size:
        raise UserError(f"image_size={cfg.image_size} is not a multiple of the tokenizer's {vq_args.downsample_factor}")
    gpt_args = dataclasses.replace(GPT_PRESETS[cfg.gpt_preset], block_size=grid * grid)
    # the T5 switches (cleaning, dtype, padding) are the run's; the sizes follow the GPT preset
    text_cfg = dataclasses.replace(
        text, kind="t5", path=cfg.t5_path, max_tokens=gpt_args.cls_token_num, dim=gpt_args.caption_dim
    )

    policy = Transformer(gpt_args)
    load_into(policy, read_state_dict(cfg.gpt_ckpt, cfg.trust_checkpoint), ignore=GPT_IGNORED_KEYS)
    tokenizer = VQModel(vq_args)
    load_into(tokenizer, read_state_dict(cfg.vq_ckpt, cfg.trust_checkpoint))
    text_encoder = build_text_encoder(text_cfg, device)
    check_compatible(gpt_args, vq_args, text_cfg, cfg.image_size)
    backbone = Backbone(text_encoder, policy.to(device).eval(), tokenizer.to(device).eval())
    return backbone, dataclasses.replace(run_cfg, gpt=gpt_args, vq=vq_args, text=text_cfg)
