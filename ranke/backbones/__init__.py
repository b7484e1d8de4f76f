"""Backbones: the `Backbone` interface (`base`) and one module per model family (`toy`,
`llamagen`, `janus`), each with a loader that returns the backbone and the run config with its
models' own arguments; `load_configured_backbone` builds the one a config names."""

from __future__ import annotations

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
        return load_toy_backbone(cfg.posttrain.policy, cfg.posttrain.tokenizer, device, run_cfg=cfg)
    if kind == "llamagen":
        return load_llamagen_backbone(cfg, device)
    if kind == "janus":
        from ranke.backbones.janus import load_janus_backbone  # transformers' Janus classes load only here

        if not cfg.backbone.model_path:
            raise UserError("backbone.kind=janus needs backbone.model_path (a local Janus-Pro directory)")
        return load_janus_backbone(cfg.backbone.model_path, device, run_cfg=cfg)
    raise UserError(f"unknown backbone.kind '{kind}' (toy, llamagen or janus)")
