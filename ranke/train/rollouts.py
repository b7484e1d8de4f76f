"""The post-training step's rollouts: G token sequences per prompt with what the stages need
(log-probs, decodes, rewards), and the row operations that DAPO's dynamic sampling uses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """G rollouts for each of B prompts, groups contiguous (prompt-major): free samples scored by
    the combined reward, or in the pixel modes VA-π's predictions of the real images' codes
    scored by reconstruction (`ranke.train.pixel_rollout`)."""

    prompts: list[str]  # B*G
    text_emb: torch.Tensor  # [B*G, T, C]
    text_mask: torch.Tensor  # [B*G, T]
    tokens: torch.Tensor  # [B*G, N]
    logp_old: torch.Tensor  # [B*G, N]
    logp_ref: torch.Tensor  # [B*G, N]
    images: torch.Tensor  # [B*G, 3, H, W] in [0, 1], decoded by the EMA decoder
    reward: torch.Tensor  # [B*G] combined, normalised reward (pixel modes: the reconstruction reward)
    components: dict[str, torch.Tensor]  # raw score of each reward [B*G] (pixel modes: the two distances)
    nonfinite: dict[str, int]  # non-finite raw scores of each reward (counted as 0 in `reward`; pixel modes: kept)
    soft_logits: tuple[torch.Tensor, torch.Tensor] | None = None  # top-k (logits, codes) [B*G, N, k] at rollout time
    # the pixel modes: the teacher-forcing context (the real codes, corrupted) the tokens were
    # predicted from, and the real codes themselves [B*G, N]; None: free samples (context = tokens)
    context: torch.Tensor | None = None
    real_codes: torch.Tensor | None = None


def rollout_rows(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The rollout's `rows` (non-finite counts kept whole)."""
    def take(value):
        if isinstance(value, torch.Tensor):
            return value[rows.to(value.device)]
        if isinstance(value, list):
            return [value[i] for i in rows.tolist()]
        if isinstance(value, tuple):
            return tuple(take(item) for item in value)
        if isinstance(value, dict) and value and isinstance(next(iter(value.values())), torch.Tensor):
            return {name: take(item) for name, item in value.items()}
        return value

    return Rollout(**{field.name: take(getattr(rollout, field.name)) for field in dataclasses.fields(Rollout)})


def join_rollouts(parts: list[Rollout]) -> Rollout:
    """Rollouts one after the other (rows concatenated, non-finite counts summed)."""
    def join(values: list):
        first = values[0]
        if isinstance(first, torch.Tensor):
            return torch.cat(values)
        if isinstance(first, list):
            return [item for value in values for item in value]
        if isinstance(first, tuple):
            return tuple(join(list(items)) for items in zip(*values))
        if isinstance(first, dict):
            return {name: join([value[name] for value in values]) for name in first}
        return None if first is None else sum(values)

    return Rollout(**{field.name: join([getattr(part, field.name) for part in parts]) for field in dataclasses.fields(Rollout)})
