"""LoRA adapters on the policy, through PEFT (an optional extra: `pip install "ranke[lora]"`).

An adapter adds a trainable low-rank update beside each targeted linear layer, `W x + (alpha /
rank) * B A x` (A: rank x in, B: out x rank, B zero at the start, so the adapted policy starts as
the base); the base weights stay frozen. Post-training uses it three ways:

* the policy stage trains only A and B (AdamW states for them alone);
* the KL anchor's reference policy is the same module with the adapter switched off
  (`PeftModel.disable_adapter`): no second copy of the weights;
* checkpoints hold the adapter's tensors only, named as in the adapted module's state dict
  (`base_model.model.layers.0.attention.wqkv.lora_A.default.weight`); `merge_adapter` folds them
  into a base policy, which is then a plain network with the base's parameter names.

Adapter dropout acts only inside `adapter_dropout` (the policy stage's training forward): the
sampler and the old and reference log-probs see the adapter without it, as the GPT's own dropout
is off outside supervised training.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ranke.runtime import UserError

# the LlamaGen GPT's attention (fused qkv, output) and SwiGLU projections (ranke.models.gpt)
GPT_TARGET_MODULES = ("wqkv", "wo", "w1", "w2", "w3")


@dataclass(frozen=True)
class LoraArgs:
    """An adapter's shape (field names follow PEFT's LoraConfig where they can)."""

    enabled: bool = False
    rank: int = 16  # r: the inner width of each update B A
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, in the policy stage's training forward only
    target_modules: tuple[str, ...] = GPT_TARGET_MODULES  # names of the linear layers that get an adapter


def require_peft():
    """PEFT, or one line saying how to install it."""
    try:
        import peft
    except ImportError:
        raise UserError(
            "LoRA (posttrain.lora.enabled=true) needs PEFT, which is not installed: pip install 'ranke[lora]'"
        ) from None
    return peft


def check_targets(policy: torch.nn.Module, targets: tuple[str, ...]) -> None:
    """One line when a target names no linear layer of `policy` (PEFT matches the last part of a
    module's name)."""
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in policy.named_modules()
                     if isinstance(module, torch.nn.Linear)})  # fmt: skip
    unknown = [target for target in targets if target not in linear]
    if unknown or not targets:
        raise UserError(
            f"LoRA target_modules {list(unknown or targets)} name no linear layer of the policy; "
            f"its linear layers are: {', '.join(linear)}"
        )


def add_adapter(policy: torch.nn.Module, args: LoraArgs) -> torch.nn.Module:
    """`policy` with a fresh adapter (a `peft.PeftModel` around it; PEFT replaces the targeted
    layers in place). Only the adapter trains; the base weights are frozen. Attributes of the
    policy (`args`, `prefill`, ...) are reached through the wrapper."""
    peft = require_peft()
    check_targets(policy, args.target_modules)
    config = peft.LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=list(args.target_modules)
    )
    return peft.get_peft_model(policy, config).eval()  # eval: adapter dropout off outside `adapter_dropout`


def adapter_names(adapted: torch.nn.Module) -> list[str]:
    """The state-dict names of the adapter's tensors (the trainable ones)."""
    return [name for name, parameter in adapted.named_parameters() if parameter.requires_grad]


def load_adapter(adapted: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load an adapter's tensors (`adapter_names`) into an adapted policy, exactly those."""
    expected = set(adapter_names(adapted))
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise UserError(
            f"the checkpoint's policy is not this LoRA adapter ({len(missing)} tensors missing, e.g. "
            f"{missing[:1]}; {len(extra)} unexpected, e.g. {extra[:1]}): resume or export it with the run's own lora settings"
        )
    adapted.load_state_dict(tensors, strict=False)


def merge_adapter(
    policy: torch.nn.Module, args: LoraArgs, tensors: dict[str, torch.Tensor], adapter_folder: Path | None = None
) -> torch.nn.Module:
    """The base `policy` with the adapter `tensors` merged into its weights (W + (alpha / rank) B A):
    the plain network again, with the base's parameter names (LlamaGen's layout). With
    `adapter_folder` the adapter is also written there in PEFT's own format (`save_pretrained`:
    adapter_config.json, adapter_model.safetensors), for `PeftModel.from_pretrained(base, folder)`."""
    adapted = add_adapter(policy, args)
    load_adapter(adapted, tensors)
    if adapter_folder is not None:
        adapted.save_pretrained(adapter_folder)
    return adapted.merge_and_unload()


def restore_policy(policy: torch.nn.Module, args: LoraArgs, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A post-training checkpoint's policy weights on its base `policy`: loaded as they are, or,
    from a LoRA run (`args.enabled`: the tensors are the adapter's), merged into it."""
    if args.enabled:
        return merge_adapter(policy, args, tensors)
    policy.load_state_dict(tensors)
    return policy


@contextlib.contextmanager
def adapter_dropout(adapted: torch.nn.Module):
    """Inside: the adapter's dropout layers act (the policy stage's training forward); nothing
    else of the policy changes mode (the GPT's own dropout is an explicit argument)."""
    layers = [module for name, module in adapted.named_modules() if name.endswith("lora_dropout.default")]
    for layer in layers:
        layer.train()
    try:
        yield
    finally:
        for layer in layers:
            layer.eval()
