"""The toy-world backbone: the toy text encoder, a toy policy and a toy VQ tokenizer from asset
files (by default the committed toy SFT policy and tokenizer)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ranke.assets import asset_path, load_asset
from ranke.backbones.base import Backbone, build_text_encoder, check_compatible
from ranke.config import RunConfig, TextConfig
from ranke.models.gpt import GPTArgs, Transformer
from ranke.models.vq import VQArgs, VQModel


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


def load_toy_backbone(
    policy_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    run_cfg: RunConfig | None = None,
) -> tuple[Backbone, RunConfig]:
    """The toy backbone from asset files (defaults: the committed toy SFT policy and tokenizer),
    and `run_cfg` (default: the defaults) with the models' own arguments (gpt, vq, text)."""
    policy, text_cfg = load_policy(policy_path, device)
    tokenizer = load_tokenizer(tokenizer_path, device)
    cfg = dataclasses.replace(run_cfg or RunConfig(), text=text_cfg, gpt=policy.args, vq=tokenizer.args)
    check_compatible(policy.args, tokenizer.args, text_cfg, cfg.toy.image_size)
    return Backbone(build_text_encoder(text_cfg, device), policy, tokenizer), cfg
