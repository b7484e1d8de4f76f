"""The backbone interface every recipe talks to: encode prompts, sample tokens with CFG,
score tokens by teacher forcing, decode tokens to pixels.

A backbone bundles a frozen text encoder, an AR policy and a VQ tokenizer. Recipes pass the
policy / decoder to use explicitly (online or EMA copies), so the backbone itself holds no
training state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ranke.assets import asset_path, load_asset
from ranke.config import BackboneConfig, RunConfig, SamplingConfig, TextConfig
from ranke.models.gpt import GPTArgs, Transformer
from ranke.models.text import T5TextEncoder
from ranke.models.vq import VQArgs, VQModel, to_unit_range
from ranke.runtime import UserError
from ranke.sampling import SampleOutput, generate, token_logprobs
from ranke.toy.text import ToyTextEncoder


# Buffers some LlamaGen checkpoints carry that are not weights (KV caches set up for sampling).
GPT_IGNORED_KEYS = ("*.kv_cache.k_cache", "*.kv_cache.v_cache", "freqs_cis", "causal_mask")


def build_text_encoder(cfg: TextConfig, device: torch.device | str = "cpu"):
    """The frozen text encoder named by the config (`toy` or `t5`)."""
    if cfg.kind == "toy":
        return ToyTextEncoder(cfg.dim, cfg.max_tokens, device, cfg.toy_encoding)
    if cfg.kind == "t5":
        if not cfg.path:
            raise UserError("text.kind=t5 needs text.path=<local flan-t5-xl directory>")
        return T5TextEncoder(cfg.path, max_length=cfg.max_tokens, device=device)
    raise UserError(f"unknown text.kind '{cfg.kind}' (toy or t5)")


def load_tokenizer(path: str | Path | None = None, device: torch.device | str = "cpu") -> VQModel:
    """A VQ tokenizer from an asset file (default: the committed toy tokenizer), in eval mode."""
    args, state = load_asset(path or asset_path("tokenizer"), "vq")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    model = VQModel(VQArgs(**args))
    model.load_state_dict(state)
    return model.to(device).eval()


def load_policy(path: str | Path | None = None, device: torch.device | str = "cpu") -> tuple[Transformer, TextConfig]:
    """A policy asset (default: the committed toy SFT policy) and the text encoder config it was trained with."""
    args, state = load_asset(path or asset_path("policy"), "policy")
    model = Transformer(GPTArgs(**args["gpt"]))
    model.load_state_dict(state)
    # assets written before the toy encoding had a version used version 1
    return model.to(device).eval(), TextConfig(**{"toy_encoding": 1, **args["text"]})


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
        return generate(
            policy or self.policy,
            text_emb,
            text_mask,
            cfg_scale=sampling.cfg_scale,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            generator=generator,
            return_logprobs=return_logprobs,
            row_offset=row_offset,
            total_rows=total_rows,
        )

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


def load_toy_backbone(
    policy_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Backbone, RunConfig]:
    """The toy backbone from asset files (defaults: the committed toy SFT policy and tokenizer)."""
    policy, text_cfg = load_policy(policy_path, device)
    tokenizer = load_tokenizer(tokenizer_path, device)
    cfg = dataclasses.replace(RunConfig(), text=text_cfg, gpt=policy.args, vq=tokenizer.args)
    check_compatible(policy.args, tokenizer.args, text_cfg, cfg.toy.image_size)
    return Backbone(build_text_encoder(text_cfg, device), policy, tokenizer), cfg


def load_llamagen_backbone(cfg: BackboneConfig, device: torch.device | str = "cpu") -> tuple[Backbone, TextConfig]:
    """LlamaGen from its official files: GPT (`gpt_ckpt`), VQ (`vq_ckpt`), flan-t5 (`t5_path`).

    Weights load strictly with weights_only unpickling (KV-cache buffers some files carry are
    ignored); the policy's token grid follows `image_size` (the GPT weights do not depend on it).
    """
    from ranke.models.gpt import GPT_PRESETS
    from ranke.models.load import load_into, read_state_dict
    from ranke.models.vq import VQ_PRESETS

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
    text_cfg = TextConfig(kind="t5", path=cfg.t5_path, max_tokens=gpt_args.cls_token_num, dim=gpt_args.caption_dim)

    policy = Transformer(gpt_args)
    load_into(policy, read_state_dict(cfg.gpt_ckpt, cfg.trust_checkpoint), ignore=GPT_IGNORED_KEYS)
    tokenizer = VQModel(vq_args)
    load_into(tokenizer, read_state_dict(cfg.vq_ckpt, cfg.trust_checkpoint))
    text_encoder = build_text_encoder(text_cfg, device)
    check_compatible(gpt_args, vq_args, text_cfg, cfg.image_size)
    return Backbone(text_encoder, policy.to(device).eval(), tokenizer.to(device).eval()), text_cfg


def load_configured_backbone(cfg: RunConfig, device: torch.device | str = "cpu") -> tuple[Backbone, RunConfig]:
    """The backbone named by `cfg.backbone`, and the config updated with its models' arguments."""
    kind = cfg.backbone.kind
    if kind == "toy":
        backbone, assets_cfg = load_toy_backbone(cfg.posttrain.policy, cfg.posttrain.tokenizer, device)
        return backbone, dataclasses.replace(cfg, gpt=assets_cfg.gpt, vq=assets_cfg.vq, text=assets_cfg.text)
    if kind == "llamagen":
        backbone, text_cfg = load_llamagen_backbone(cfg.backbone, device)
        return backbone, dataclasses.replace(cfg, gpt=backbone.policy.args, vq=backbone.tokenizer.args, text=text_cfg)
    if kind == "janus":
        from ranke.models.janus import load_janus_backbone

        if not cfg.backbone.model_path:
            raise UserError("backbone.kind=janus needs backbone.model_path (a local Janus-Pro directory)")
        return load_janus_backbone(cfg.backbone.model_path, device), cfg
    raise UserError(f"unknown backbone.kind '{kind}' (toy, llamagen or janus)")
