"""The networks and optimizers of a post-training run (`ranke.train.posttrain`): the starting
policy and tokenizer of the configured backbone, their EMA copies, the reference policy, and,
when the decoder trains, a discriminator and the perceptual distance.

With `posttrain.lora.enabled` the policy carries a LoRA adapter (`ranke.models.lora`): only the
adapter trains, its AdamW states and its EMA are the adapter's alone, the reference policy is the
policy itself with the adapter switched off, and checkpoints hold the adapter's tensors only."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from ranke.backbones import Backbone, load_configured_backbone
from ranke.config import PosttrainConfig, RunConfig
from ranke.models.discriminator import PatchDiscriminator
from ranke.models.lora import add_adapter, adapter_dropout, load_adapter, require_peft
from ranke.models.perceptual import build_perceptual
from ranke.parallel import full_state_dict
from ranke.runtime import UserError
from ranke.train.guard import StepGuard
from ranke.train.state import EMA
from ranke.train.trainer_state import GuardedOptimizer


@dataclass
class Models:
    policy: torch.nn.Module
    policy_ema: EMA  # with a LoRA adapter: of the adapter's tensors only
    # the KL anchor's policy: a frozen copy of the start, or the EMA policy; None with a LoRA
    # adapter: the policy with the adapter switched off (`reference_policy`)
    reference: torch.nn.Module | None
    vq: torch.nn.Module
    vq_ema: EMA
    disc: PatchDiscriminator | None  # the decoder stage's networks: None unless the decoder trains
    perceptual: torch.nn.Module | None
    adapter: bool = False  # whether the policy carries a LoRA adapter (`posttrain.lora`)

    @contextlib.contextmanager
    def reference_policy(self):
        """Inside: the reference policy, to score the rollouts' reference log-probs."""
        if not self.adapter:
            yield self.reference
            return
        with self.policy.disable_adapter():  # the same weights, without the adapter: no second copy
            yield self.policy

    def training_forward(self):
        """Around the policy stage's loss forward: a LoRA adapter's dropout acts there only."""
        return adapter_dropout(self.policy) if self.adapter else contextlib.nullcontext()

    def checkpoint_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every network's whole weights by file stem, the policy's adapter alone when it has one
        (a collective when the policy is sharded: call on all processes)."""
        tensors = {
            "policy": full_state_dict(self.policy, trainable_only=self.adapter),
            "policy_ema": self.policy_ema.state_dict(),
            "vq": self.vq.state_dict(),
            "vq_ema": self.vq_ema.state_dict(),
        }
        if self.disc is not None:
            tensors["discriminator"] = self.disc.state_dict()
        return tensors

    def load_weights(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Load a checkpoint's weights (before the policy is sharded)."""
        if self.adapter:
            load_adapter(self.policy, tensors["policy"])
        else:
            self.policy.load_state_dict(tensors["policy"])
        self.policy_ema.load_state_dict(tensors["policy_ema"])
        self.vq.load_state_dict(tensors["vq"])
        self.vq_ema.load_state_dict(tensors["vq_ema"])
        if self.disc is not None:
            if "discriminator" not in tensors:
                raise UserError("the checkpoint has no discriminator: it was written by a mode=policy run")
            self.disc.load_state_dict(tensors["discriminator"])


def build_models(cfg: RunConfig, device: torch.device, backbone: Backbone | None = None) -> tuple[Models, Backbone, RunConfig]:
    """The starting policy and tokenizer (`cfg.backbone`, or the `backbone` given from Python, moved
    to `device`), their EMA copies, the reference and the decoder-stage networks; returns the
    config updated with the models' own arguments (a given backbone's: the config's as they are)."""
    pcfg = cfg.posttrain
    if backbone is None:
        backbone, cfg = load_configured_backbone(cfg, device)
    else:
        backbone.policy.to(device), backbone.tokenizer.to(device)
    policy = backbone.policy.float().requires_grad_(pcfg.trains_policy)
    if pcfg.lora.enabled:
        policy = add_adapter(policy, pcfg.lora)
    vq = backbone.tokenizer.float().requires_grad_(False)
    if pcfg.trains_decoder:  # only the decoder and post_quant_conv: the token space never moves
        for parameter in vq.decoder_parameters():
            parameter.requires_grad_(True)
    policy_ema = EMA(policy, pcfg.policy_ema_decay, trainable_only=pcfg.lora.enabled)
    reference = None
    if not pcfg.lora.enabled:
        reference = copy.deepcopy(policy).requires_grad_(False) if pcfg.reference == "frozen" else policy_ema.module
    disc = perceptual = None
    if pcfg.trains_decoder:
        disc = PatchDiscriminator(base_channels=pcfg.disc_channels, n_layers=pcfg.disc_layers).to(device)
    if pcfg.trains_decoder or pcfg.aligns_pixels:  # L_recon and L_consist; the pixel modes' reward
        perceptual = build_perceptual(pcfg.perceptual, pcfg.vgg_path, pcfg.lpips_lin_path).to(device)
    models = Models(
        policy=policy, policy_ema=policy_ema, reference=reference, vq=vq, vq_ema=EMA(vq, pcfg.decoder_ema_decay),
        disc=disc, perceptual=perceptual, adapter=pcfg.lora.enabled,
    )  # fmt: skip
    return models, backbone, cfg


def check_lora(pcfg: PosttrainConfig) -> None:
    """One line for LoRA settings a run cannot use, before anything is written (the target
    modules are checked against the policy when it is built)."""
    if not pcfg.lora.enabled:
        return
    require_peft()
    if not pcfg.trains_policy:
        raise UserError("posttrain.lora trains an adapter in the policy stage; mode=decoder has none (use policy or both)")
    if pcfg.reference != "frozen":
        raise UserError(
            "with posttrain.lora.enabled the reference policy is the base policy (the adapter switched off): "
            "set posttrain.reference=frozen"
        )


def build_optimizers(models: Models, pcfg: PosttrainConfig, guard_limit: int, device) -> dict[str, GuardedOptimizer]:
    """AdamW for what trains, by name (policy; decoder and disc), each with its non-finite guard
    (`guard_limit`: `max_consecutive_skips`). Build after sharding: FSDP replaces the parameters."""
    optimizers = {}
    if pcfg.trains_policy:
        trainable = [parameter for parameter in models.policy.parameters() if parameter.requires_grad]  # a LoRA adapter's alone
        adamw = torch.optim.AdamW(trainable, lr=pcfg.policy_lr, weight_decay=pcfg.policy_weight_decay)
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
