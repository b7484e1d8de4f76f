"""Non-finite guard for optimizer steps: one NaN must never reach the weights.

Every recipe asks a `StepGuard` before each `optimizer.step()` whether the step's loss terms and
gradient norm are finite. A non-finite step is skipped (no update; the caller also leaves the EMA
alone), counted and reported in the step's metrics; `max_consecutive_skips` skips in a row of one
optimizer stop the run with one line naming the step and the term. With several processes the
decision is agreed over all of them (a skip anywhere is a skip everywhere), so replicas never
diverge.
"""

from __future__ import annotations

import math

import torch

from ranke.runtime import UserError


class NonFiniteError(UserError):
    """Too many consecutive non-finite steps: the run stops (one line, exit code 2)."""


def first_nonfinite(terms: dict[str, object]) -> str | None:
    """Name of the first term that is not finite (tensors: any element), or None."""
    for name, value in terms.items():
        if torch.is_tensor(value):
            if not bool(torch.isfinite(value.detach()).all()):
                return name
        elif not math.isfinite(float(value)):
            return name
    return None


def _agree(local_ok: bool, device: torch.device | None) -> bool:
    """True only when every process's step is finite (an all-reduce MIN when distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local_ok
    flag = torch.tensor([1 if local_ok else 0], dtype=torch.int32, device=device or "cpu")
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


class StepGuard:
    """Skip bookkeeping for one optimizer (`name`: policy, decoder, discriminator, ...).

    `max_consecutive` (0: never stop) bounds the skips in a row; `total` counts every skip of
    the run (restored on resume through `state_dict`)."""

    def __init__(self, name: str, max_consecutive: int, device: torch.device | None = None):
        self.name, self.max_consecutive, self.device = name, max_consecutive, device
        self.total = 0
        self.consecutive = 0

    def allow(self, step: int, terms: dict[str, object]) -> bool:
        """Whether the step with these loss terms (and gradient norm) may update the weights.

        `step` is the 1-based step number, for the message when the run stops."""
        bad = first_nonfinite(terms)
        if _agree(bad is None, self.device):
            self.consecutive = 0
            return True
        self.total += 1
        self.consecutive += 1
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            where = bad or "a term on another process"
            raise NonFiniteError(
                f"step {step}: {where} is not finite for {self.consecutive} consecutive {self.name} steps "
                f"(max_consecutive_skips="
                f"{self.max_consecutive}); lower the learning rate or check the rewards, then --resume from the "
                "last checkpoint"
            )
        return False

    def metrics(self) -> dict[str, int]:
        return {f"skipped/{self.name}": self.total}

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])


def gradient_norm(parameters) -> torch.Tensor:
    """Global 2-norm of the parameters' gradients (no clipping)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def guarded_step(
    guard: StepGuard, optimizer: torch.optim.Optimizer, step: int, terms: dict[str, object]
) -> bool:
    """`optimizer.step()` when `guard` allows the step's `terms`; returns whether it stepped.

    A skipped step leaves the gradients in place for the next `zero_grad`, and the optimizer's
    state (moments, step count) untouched."""
    if not guard.allow(step, terms):
        return False
    optimizer.step()
    return True
