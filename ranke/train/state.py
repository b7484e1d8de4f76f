"""Training state shared by every recipe: EMA copies and RNG state (checkpoints: `ranke.checkpoint`)."""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import torch

from ranke.runtime import UserError


class EMA:
    """Exponential moving average of a module's parameters and floating buffers.

    `module` is a frozen deep copy (eval mode, no grad) usable for inference. Its floating
    tensors are kept in fp32 so that small updates (1 - decay = 1e-3) are not rounded away
    when the model trains in bf16; other buffers are copied.

    With `trainable_only` (a LoRA adapter: the rest is frozen and never moves) only the trainable
    parameters are averaged, as fp32 tensors by state-dict name, and there is no `module` (None).
    """

    def __init__(self, model: torch.nn.Module, decay: float, trainable_only: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = None
        self.tensors: dict[str, torch.Tensor] | None = None  # the shadow when `trainable_only`
        if trainable_only:
            self.tensors = {
                name: parameter.detach().float().clone()
                for name, parameter in model.named_parameters()
                if parameter.requires_grad
            }
            return
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        for parameter in self.module.parameters():
            parameter.grad = None

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * model, i.e. lerp toward the model by 1 - decay.

        Tied weights appear under several names with one storage: each is updated once. With a
        sharded model (FSDP) every process must call it: each tensor is gathered from the shards.
        """
        shadow = self.state_dict()
        updated = set()
        for name, value in model.state_dict().items():
            target = shadow.get(name)
            if target is None or target.data_ptr() in updated:  # not averaged (frozen), or tied
                continue
            updated.add(target.data_ptr())
            if hasattr(value, "full_tensor"):  # an FSDP-sharded tensor: gathered whole, in fp32, one at a time
                value = value.full_tensor()
            if target.is_floating_point():
                target.lerp_(value.detach().to(target.device, torch.float32), 1.0 - self.decay)
            else:
                target.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights (a flat tensor dict, ready for a `.safetensors` file)."""
        return self.tensors if self.module is None else self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.module is not None:
            self.module.load_state_dict(state)
            return
        if set(state) != set(self.tensors):
            raise UserError("the checkpoint's EMA policy is not of this LoRA adapter: resume with the run's lora settings")
        for name, value in state.items():
            self.tensors[name].copy_(value)


def _plain(value: Any) -> Any:
    """numpy arrays/scalars and tuples -> lists and Python numbers, so weights_only loading accepts them."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def rng_state(generators: dict[str, torch.Generator | np.random.Generator] | None = None) -> dict:
    """Snapshot of every random stream a run uses, made of tensors and Python primitives only.

    Global streams: torch CPU, torch CUDA (all devices, when available), numpy's legacy global
    RandomState, Python `random`. `generators` are the run's explicit named generators
    (torch.Generator on any device, or numpy Generator).
    """
    named = {}
    for name, generator in (generators or {}).items():
        if isinstance(generator, torch.Generator):
            named[name] = {"kind": "torch", "state": generator.get_state()}
        elif isinstance(generator, np.random.Generator):
            named[name] = {"kind": "numpy", "state": _plain(generator.bit_generator.state)}
        else:
            raise TypeError(f"generator '{name}' is a {type(generator).__name__}, not a torch or numpy Generator")
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _plain(np.random.get_state(legacy=False)),
        "python": _plain(random.getstate()),
        "generators": named,
    }


def _tuples(value: Any) -> Any:
    """Inverse of `_plain` for Python's random state, which must be nested tuples."""
    return tuple(_tuples(item) for item in value) if isinstance(value, list) else value


def restore_rng_state(state: dict, generators: dict[str, torch.Generator | np.random.Generator] | None = None) -> None:
    """Restore a `rng_state` snapshot; `generators` are restored in place, matched by name.

    CUDA states are restored for the devices present (a resume on fewer GPUs keeps the rest
    fresh). A named generator missing from the snapshot is an error, so a renamed stream
    cannot silently restart from its seed.
    """
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state["torch_cuda"]
    if cuda_states and torch.cuda.is_available():
        for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    np.random.set_state(state["numpy"])
    random.setstate(_tuples(state["python"]))
    saved = state["generators"]
    for name, generator in (generators or {}).items():
        if name not in saved:
            known = ", ".join(saved) or "none"
            raise UserError(f"checkpoint has no RNG state for generator '{name}' (it has: {known})")
        if isinstance(generator, torch.Generator):
            generator.set_state(saved[name]["state"])
        else:
            generator.bit_generator.state = saved[name]["state"]
