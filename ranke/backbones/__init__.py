"""Backbones: the `Backbone` interface (`base`) and one module per model family (`toy`,
`llamagen`, `janus`); `load_configured_backbone` builds the one a config names."""

from __future__ import annotations

import dataclasses

import torch

from ranke.backbones.base import Backbone
from ranke.backbones.llamagen import load_llamagen_backbone
from ranke.backbones.toy import load_toy_backbone
from ranke.config import RunConfig
from ranke.runtime import UserError

__all__ = ["Backbone", "load_configured_backbone", "load_llamagen_backbone", "load_toy_backbone"]


def load_configured_backbone(cfg: RunConfig, device: torch.device | str = "cpu") -> tuple[Backbone, RunConfig]:
    """The backbone named by `cfg.backbone`, and the config updated with its models' arguments."""
    kind = cfg.backbone.kind
    if kind == "toy":
        backbone, assets_cfg = load_toy_backbone(cfg.posttrain.policy, cfg.posttrain.tokenizer, device)
        return backbone, dataclasses.replace(cfg, gpt=assets_cfg.gpt, vq=assets_cfg.vq, text=assets_cfg.text)
    if kind == "llamagen":
        backbone, text_cfg = load_llamagen_backbone(cfg.backbone, device, cfg.text)
        return backbone, dataclasses.replace(cfg, gpt=backbone.policy.args, vq=backbone.tokenizer.args, text=text_cfg)
    if kind == "janus":
        from ranke.backbones.janus import load_janus_backbone  # transformers' Janus classes load only here

        if not cfg.backbone.model_path:
            raise UserError("backbone.kind=janus needs backbone.model_path (a local Janus-Pro directory)")
        return load_janus_backbone(cfg.backbone.model_path, device), cfg
    raise UserError(f"unknown backbone.kind '{kind}' (toy, llamagen or janus)")
