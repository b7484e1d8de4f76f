"""The user's own parts given to post-training as Python objects (`ranke.api`) instead of named in
the config: reward objects, a prompt list or prompt source, a backbone.

A run records what it was given in its config's `objects` section (`ObjectsConfig`, through
`UserObjects.described`): a reward function or instance by its `module.qualname`, a prompt list by
its length and sha256, a prompt source by its class, a backbone by its class and parameter counts.
A resume compares that record (`ranke.train.resume`), so it needs the same objects again; a run
whose config records objects it is not given (the command line gives none) stops with one line
(`UserObjects.require`) before anything is written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

from ranke.backbones import Backbone
from ranke.config import ObjectsConfig, to_dict
from ranke.data import PromptSource
from ranke.runtime import UserError

PROMPT_SOURCE_METHODS = ("next_batch", "state_dict", "load_state_dict")  # the `ranke.data.PromptSource` protocol


def qualified_name(obj) -> str:
    """`module.qualname` of a function or class; `module.qualname instance` of any other object."""
    if hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    return f"{type(obj).__module__}.{type(obj).__qualname__} instance"


def describe_prompts(prompts: list[str] | PromptSource) -> str:
    """A prompt list by its length and content hash (two different lists differ); a source by its class."""
    if isinstance(prompts, list):
        digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
        return f"list of {len(prompts)} prompts, sha256 {digest}"
    return qualified_name(prompts)


def describe_backbone(backbone: Backbone) -> str:
    count = lambda module: sum(parameter.numel() for parameter in module.parameters())  # noqa: E731
    return f"{qualified_name(backbone)} (policy {count(backbone.policy)} parameters, tokenizer {count(backbone.tokenizer)})"


@dataclass
class UserObjects:
    """Objects a post-training run is given from Python, each checked for its kind with one line."""

    rewards: dict[str, Callable] = field(default_factory=dict)  # reward name -> function or instance
    prompts: list[str] | PromptSource | None = None  # toy-grammar prompts, or prompts with their real images
    backbone: Backbone | None = None

    def __post_init__(self):
        if not isinstance(self.rewards, dict) or not all(isinstance(name, str) and name for name in self.rewards):
            raise UserError("rewards must be a dict of reward objects by name, e.g. rewards={'brightness': brightness}")
        self.prompts = checked_prompts(self.prompts)
        if self.backbone is not None and not isinstance(self.backbone, Backbone):
            raise UserError(
                f"backbone is a {type(self.backbone).__name__}, not a ranke.backbones.Backbone "
                "(ranke.backbones.load_toy_backbone, load_llamagen_backbone or your own subclass)"
            )

    @property
    def given(self) -> bool:
        return bool(self.rewards) or self.prompts is not None or self.backbone is not None

    def described(self) -> dict:
        """The config's `objects` section (an `ObjectsConfig` mapping) for these objects."""
        return {
            "rewards": {name: qualified_name(reward) for name, reward in self.rewards.items()},
            "prompts": None if self.prompts is None else describe_prompts(self.prompts),
            "backbone": None if self.backbone is None else describe_backbone(self.backbone),
        }

    def require(self, recorded: ObjectsConfig) -> None:
        """One line when the config records objects (`recorded`) these are not: a run from the
        command line, or a config.yaml of a run started from Python."""
        missing = [f"reward '{name}' ({what})" for name, what in recorded.rewards.items() if name not in self.rewards]
        missing += [f"prompts ({recorded.prompts})"] if recorded.prompts is not None and self.prompts is None else []
        missing += [f"backbone ({recorded.backbone})"] if recorded.backbone is not None and self.backbone is None else []
        if missing:
            raise UserError(
                f"the config records {missing[0]} given as a Python object, which the command line cannot give: "
                "run from Python with the same objects, ranke.posttrain(cfg, out, rewards=..., prompts=..., backbone=...)"
            )
        if self.described() != to_dict(recorded):
            raise UserError(f"the config's objects section {to_dict(recorded)} does not describe the objects given, {self.described()}")


def checked_prompts(prompts) -> list[str] | PromptSource | None:
    """A prompt list (copied) or a `PromptSource`; one line for anything else."""
    if prompts is None:
        return None
    if isinstance(prompts, (list, tuple)):
        if not prompts or not all(isinstance(prompt, str) and prompt.strip() for prompt in prompts):
            raise UserError("prompts must be a non-empty list of non-empty strings")
        return [prompt.strip() for prompt in prompts]
    if isinstance(prompts, str):
        raise UserError("prompts is one string; give a list of prompts, e.g. prompts=['a large red circle']")
    lacking = [method for method in PROMPT_SOURCE_METHODS if not callable(getattr(prompts, method, None))]
    if lacking:
        raise UserError(
            f"prompts is a {type(prompts).__name__}: neither a list of strings nor a prompt source "
            f"(ranke.data.PromptSource; it lacks {', '.join(lacking)})"
        )
    return prompts
