"""The networks and optimizers of a post-training run (`ranke.train.posttrain`): the starting
policy and tokenizer of the configured backbone, their EMA copies, the reference policy, and,
when the decoder trains, a discriminator and the perceptual distance."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ranke.backbones import Backbone, load_configured_backbone
from ranke.config import PosttrainConfig, RunConfig
from ranke.models.discriminator import PatchDiscriminator
from ranke.models.perceptual import build_perceptual
from ranke.parallel import full_state_dict
from ranke.runtime import UserError
from ranke.train.guard import StepGuard
from ranke.train.state import EMA
from ranke.train.trainer_state import GuardedOptimizer


@dataclass
class Models:
    policy: torch.nn.Module
    policy_ema: EMA
    reference: torch.nn.Module  # the KL anchor's policy: a frozen copy of the start, or the EMA policy
    vq: torch.nn.Module
    vq_ema: EMA
    disc: PatchDiscriminator | None  # the decoder stage's networks: None unless the decoder trains
    perceptual: torch.nn.Module | None

    def checkpoint_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every network's whole weights by file stem (a collective when the policy is sharded: call
        on all processes)."""
        tensors = {
            "policy": full_state_dict(self.policy),
            "policy_ema": self.policy_ema.state_dict(),
            "vq": self.vq.state_dict(),
            "vq_ema": self.vq_ema.state_dict(),
        }
        if self.disc is not None:
            tensors["discriminator"] = self.disc.state_dict()
        return tensors

    def load_weights(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Load a checkpoint's weights (before the policy is sharded)."""
        self.policy.load_state_dict(tensors["policy"])
        self.policy_ema.load_state_dict(tensors["policy_ema"])
        self.vq.load_state_dict(tensors["vq"])
        self.vq_ema.load_state_dict(tensors["vq_ema"])
        if self.disc is not None:
            if "discriminator" not in tensors:
                raise UserError("the checkpoint has no discriminator: it was written by a mode=policy run")
            self.disc.load_state_dict(tensors["discriminator"])


def build_models(cfg: RunConfig, device: torch.device) -> tuple[Models, Backbone, RunConfig]:
    """The starting policy and tokenizer (`cfg.backbone`), their EMA copies, the reference and the
    decoder-stage networks; returns the config updated with the models' own arguments."""
    pcfg = cfg.posttrain
    backbone, cfg = load_configured_backbone(cfg, device)
    policy = backbone.policy.float().requires_grad_(pcfg.trains_policy)
    vq = backbone.tokenizer.float().requires_grad_(False)
    if pcfg.trains_decoder:  # only the decoder and post_quant_conv: the token space never moves
        for parameter in vq.decoder_parameters():
            parameter.requires_grad_(True)
    policy_ema = EMA(policy, pcfg.policy_ema_decay)
    reference = copy.deepcopy(policy).requires_grad_(False) if pcfg.reference == "frozen" else policy_ema.module
    disc = perceptual = None
    if pcfg.trains_decoder:
        disc = PatchDiscriminator(base_channels=pcfg.disc_channels, n_layers=pcfg.disc_layers).to(device)
    if pcfg.trains_decoder or pcfg.aligns_pixels:  # L_recon and L_consist; the pixel modes' reward
        perceptual = build_perceptual(pcfg.perceptual, pcfg.vgg_path, pcfg.lpips_lin_path).to(device)
    models = Models(
        policy=policy, policy_ema=policy_ema, reference=reference, vq=vq, vq_ema=EMA(vq, pcfg.decoder_ema_decay),
        disc=disc, perceptual=perceptual,
    )  # fmt: skip
    return models, backbone, cfg


def build_optimizers(models: Models, pcfg: PosttrainConfig, guard_limit: int, device) -> dict[str, GuardedOptimizer]:
    """AdamW for what trains, by name (policy; decoder and disc), each with its non-finite guard
    (`guard_limit`: `max_consecutive_skips`). Build after sharding: FSDP replaces the parameters."""
    optimizers = {}
    if pcfg.trains_policy:
        adamw = torch.optim.AdamW(models.policy.parameters(), lr=pcfg.policy_lr, weight_decay=pcfg.policy_weight_decay)
        optimizers["policy"] = GuardedOptimizer(
            optimizer=adamw, module=models.policy, guard=StepGuard("policy", guard_limit, device), lr=pcfg.policy_lr
        )
    if pcfg.trains_decoder:
        adamw = torch.optim.AdamW(
            models.vq.decoder_parameters(), lr=pcfg.decoder_lr, weight_decay=pcfg.decoder_weight_decay
        )
        optimizers["decoder"] = GuardedOptimizer(
            optimizer=adamw, module=models.vq, guard=StepGuard("decoder", guard_limit, device), lr=pcfg.decoder_lr
        )
        adamw = torch.optim.AdamW(
            models.disc.parameters(), lr=pcfg.disc_lr, betas=tuple(pcfg.disc_betas), weight_decay=pcfg.disc_weight_decay
        )
        optimizers["disc"] = GuardedOptimizer(
            optimizer=adamw, module=models.disc, guard=StepGuard("disc", guard_limit, device), lr=pcfg.disc_lr
        )
    return optimizers
