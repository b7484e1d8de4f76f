"""The reward protocol, in one place: what every reward (built-in or the user's own) is and returns.

A reward scores decoded images against their prompts. It knows nothing about the generator:
post-training hands it pixels and reads back one number per image. The contract:

* input: `images` float [B, 3, H, W] with pixels in [0, 1], on the run's device; `prompts`, B strings
  (a prompt-blind reward ignores them);
* output: scores [B], a floating-point tensor, every value finite, higher is better;
* `name`: the key of the reward in the config, the logs and `CombinedReward`;
* `differentiable`: whether gradients flow from the scores back to the pixels (the decoder
  stage's `L_reward` uses only such rewards; a reward that is not is scored without a graph).

`check_scores` is the output half of the contract; `check_batch` the input half. A user's reward
(`ranke.rewards.user`) is checked on every call; the built-ins are checked for shape and dtype by
`CombinedReward`, which tolerates their rare non-finite values (it counts and zeroes them).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from ranke.runtime import UserError


@runtime_checkable
class Reward(Protocol):
    """Anything that scores a batch of images against their prompts (the module docstring's contract)."""

    name: str
    differentiable: bool

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Score `images` [B, 3, H, W] (float in [0, 1]) against `prompts` (B strings); returns [B]."""
        ...


def check_batch(images: torch.Tensor, prompts: Sequence[str]) -> None:
    """Fail early, with the shapes in the message, on a malformed reward batch."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"reward images must be [B, 3, H, W], got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")


def check_scores(name: str, scores, batch: int, finite: bool = True) -> torch.Tensor:
    """`scores` when reward `name` kept its promise for a batch of `batch` images: a floating-point
    tensor of shape [batch], all finite unless `finite` is False; otherwise one line naming the
    reward and what was wrong (`UserError`)."""
    if not isinstance(scores, torch.Tensor):
        raise UserError(f"reward '{name}' returned {type(scores).__name__}, not a torch.Tensor of {batch} scores")
    if tuple(scores.shape) != (batch,):
        raise UserError(f"reward '{name}' returned shape {tuple(scores.shape)}, expected ({batch},): one score per image")
    if not scores.is_floating_point():
        raise UserError(f"reward '{name}' returned dtype {scores.dtype}, expected a floating-point tensor")
    if finite:
        bad = int((~torch.isfinite(scores.detach())).sum())
        if bad:
            raise UserError(f"reward '{name}' returned {bad} non-finite score(s) (NaN or inf) of {batch}")
    return scores
