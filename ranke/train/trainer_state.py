"""The trainer state every recipe checkpoints beside its weights: one format, with a version.

    {"version": 2, "step": N,
     "optimizers": {name: optimizer state}, "schedules": {name: LambdaLR state},
     "guards": {name: StepGuard state}, "rng": ranke.train.state.rng_state(...),
     ...the recipe's own entries (post-training: "policy_sharding", "reward_stats", "data")}

Every optimizer of a recipe is a `GuardedOptimizer`: the optimizer, the module it steps, its
non-finite guard (`ranke.train.guard`), its learning-rate schedule if any, and its configured
learning rate, which a resume sets into the restored optimizer (`ranke.train.resume`).

Checkpoints written before the format had a version kept each recipe's own names (SFT:
"optimizer", "schedule", "guard"; tokenizer: "optimizer", "optimizer_disc", "schedule", "guards";
post-training: the names above); `upgrade` reads them as version 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ranke.parallel import load_optimizer_state_dict, optimizer_state_dict
from ranke.runtime import UserError
from ranke.train import state as state_lib
from ranke.train.guard import StepGuard, guarded_step
from ranke.train.resume import set_learning_rate

TRAINER_STATE_VERSION = 2
Generators = dict[str, torch.Generator | np.random.Generator]


@dataclass
class GuardedOptimizer:
    """One optimizer of a recipe and what its steps and checkpoints need."""

    optimizer: torch.optim.Optimizer
    module: torch.nn.Module  # whose parameters it steps (a sharded module keys the state by parameter name)
    guard: StepGuard  # skips a step whose loss terms or gradient norm are not finite
    lr: float  # the configured learning rate (the schedule's base rate)
    schedule: torch.optim.lr_scheduler.LambdaLR | None = None  # stepped after every step, taken or skipped

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, step: int, terms: dict[str, object]) -> bool:
        """The optimizer step of 1-based step `step` when `terms` are finite; returns whether it stepped."""
        stepped = guarded_step(self.guard, self.optimizer, step, terms)
        if self.schedule is not None:
            self.schedule.step()
        return stepped

    @property
    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def trainer_state(step: int, optimizers: dict[str, GuardedOptimizer], generators: Generators, **extra) -> dict:
    """The version-2 trainer state after `step` (a collective when a module is sharded)."""
    return {
        "version": TRAINER_STATE_VERSION,
        "step": step,
        "optimizers": {name: optimizer_state_dict(part.module, part.optimizer) for name, part in optimizers.items()},
        "schedules": {name: part.schedule.state_dict() for name, part in optimizers.items() if part.schedule},
        "guards": {name: part.guard.state_dict() for name, part in optimizers.items()},
        "rng": state_lib.rng_state(generators),
        **extra,
    }


def restore_trainer_state(state: dict, optimizers: dict[str, GuardedOptimizer], generators: Generators) -> None:
    """Load a version-2 trainer state (`upgrade` an older one first) into the recipe's optimizers,
    schedules, guards and generators, with each optimizer's configured learning rate."""
    for name, part in optimizers.items():
        load_optimizer_state_dict(part.module, part.optimizer, state["optimizers"][name])
        if part.schedule is not None:
            part.schedule.load_state_dict(state["schedules"][name])
        set_learning_rate(part.optimizer, part.lr, part.schedule)
        if name in state["guards"]:  # a checkpoint from before the guards counts from zero
            part.guard.load_state_dict(state["guards"][name])
    state_lib.restore_rng_state(state["rng"], generators)


# the names each recipe's unversioned (version 1) trainer state gave its optimizers and schedule
_VERSION_1_NAMES = {
    "sft": {"optimizer": "policy"},
    "tokenizer": {"optimizer": "vq", "optimizer_disc": "disc"},
}


def upgrade(state: dict, recipe: str) -> dict:
    """`state` as version 2, read from any version this code knows (see the module docstring)."""
    version = state.get("version", 1)
    if version > TRAINER_STATE_VERSION:
        raise UserError(
            f"the checkpoint's trainer state has version {version}; this ranke reads up to {TRAINER_STATE_VERSION}: "
            "upgrade ranke to resume it"
        )
    if version == TRAINER_STATE_VERSION:
        return state
    names = _VERSION_1_NAMES.get(recipe, {})
    upgraded = {key: value for key, value in state.items() if key not in (*names, "schedule", "guard")}
    if names:
        upgraded["optimizers"] = {new: state[old] for old, new in names.items()}
        first = next(iter(names.values()))  # the schedule and the lone guard were the first optimizer's
        upgraded["schedules"] = {first: state["schedule"]} if "schedule" in state else {}
        upgraded["guards"] = state.get("guards", {first: state["guard"]} if "guard" in state else {})
    upgraded.setdefault("schedules", {})
    upgraded.setdefault("guards", {})
    return {**upgraded, "version": TRAINER_STATE_VERSION}
