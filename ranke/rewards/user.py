"""A reward from the user's own code, named `package.module:attribute` in `posttrain.rewards`.

The attribute is either

* a function `score(images, prompts) -> scores` keeping the contract of `ranke.rewards.protocol`
  (images float [B, 3, H, W] in [0, 1] on the run's device, B prompts -> [B] finite floats), or
* a class, constructed once per run as `cls(device=<the run's device>, **posttrain.reward_args[name])`
  (`device` is passed only when its `__init__` has a parameter of that name), whose instances are
  such functions.

Two optional attributes, read from the function or the instance:

* `differentiable` (default False): True when gradients flow from the scores to the pixels; the
  decoder stage's `L_reward` then uses the reward (otherwise it is scored without a graph);
* `batch_size` (default: the whole batch): score at most this many images per call.

From Python (`ranke.api`) the same function or instance may be given as an object, under a name
of the user's choosing; it is held to the same contract (`UserReward.of_object`).

The module is imported with the current directory at the end of `sys.path` (a file beside the
config works, as does a folder on PYTHONPATH). The name is resolved when the config is validated
(`resolve_user_reward`), before a run directory is written; every call's scores are checked
(`check_scores`) and an exception the reward raises becomes one line naming it (`UserError`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Callable

import torch

from ranke.rewards.protocol import check_scores
from ranke.runtime import UserError

PROBE_PROMPTS = ("a red circle above a blue square", "a photo of a cat on a sofa")


def is_user_reward(name: str) -> bool:
    """Whether reward name `name` points into the user's code (`package.module:attribute`)."""
    return ":" in name


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def resolve_user_reward(name: str) -> Callable:
    """The callable `package.module:attribute` names (a function or a class); one line when the
    module does not import, the attribute is missing or it is not callable."""
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise UserError(f"reward '{name}' must be written package.module:attribute")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever the module raises while it is imported
        raise UserError(
            f"reward '{name}': module '{module_name}' cannot be imported ({_first_line(err)}); "
            "put its folder on PYTHONPATH or run from it"
        ) from err
    target = getattr(module, attribute, None)
    if target is None:
        raise UserError(f"reward '{name}': module '{module_name}' ({module.__file__}) has no attribute '{attribute}'")
    if not callable(target):
        raise UserError(f"reward '{name}' is a {type(target).__name__}, not a function or class")
    return target


class UserReward:
    """A user's scorer under the `Reward` protocol: the optional attributes read, the batch split
    by `batch_size`, every call's scores checked and any exception turned into one line."""

    def __init__(self, name: str, scorer: Callable):
        self.name, self.scorer = name, scorer
        self.differentiable = getattr(scorer, "differentiable", False)
        self.batch_size = getattr(scorer, "batch_size", None)
        if not isinstance(self.differentiable, bool):
            raise UserError(f"reward '{name}': differentiable must be True or False, got {self.differentiable!r}")
        if self.batch_size is not None and (
            not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1
        ):
            raise UserError(f"reward '{name}': batch_size must be a positive integer or None, got {self.batch_size!r}")

    @classmethod
    def of_object(cls, name: str, scorer) -> UserReward:
        """A reward object given from Python (`ranke.api`) under `name`: a function or an instance
        with `__call__(images, prompts)`, held to the same contract as a named one."""
        if inspect.isclass(scorer):
            raise UserError(
                f"reward object '{name}' is the class {scorer.__name__}; pass an instance of it "
                "(a class is constructed only when it is named package.module:attribute)"
            )
        if not callable(scorer):
            raise UserError(
                f"reward object '{name}' is a {type(scorer).__name__}, not a function or an object with "
                "__call__(images, prompts)"
            )
        return cls(name, scorer)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        step = self.batch_size or images.shape[0]
        chunks = [self._score(images[i : i + step], list(prompts[i : i + step])) for i in range(0, images.shape[0], step)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        try:
            scores = self.scorer(images, prompts)
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"reward '{self.name}' raised {_first_line(err)}") from err
        return check_scores(self.name, scores, images.shape[0]).to(images.device)

    @torch.no_grad()
    def probe(self, image_size: int, device: torch.device | str) -> None:
        """Score two seeded random images once, so that a reward which breaks its contract stops
        the run before anything persistent is written."""
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(len(PROBE_PROMPTS), 3, image_size, image_size, generator=generator).to(device)
        self(images, list(PROBE_PROMPTS))


def build_user_reward(name: str, device: torch.device | str, args: dict) -> UserReward:
    """The reward `package.module:attribute` names: a class constructed with `device` (when its
    `__init__` takes one) and `args`, or a function used as it is."""
    target = resolve_user_reward(name)
    if not inspect.isclass(target):
        if args:
            raise UserError(f"posttrain.reward_args names '{name}', a function; only a class takes arguments")
        return UserReward(name, target)
    kwargs = dict(args)
    if "device" in inspect.signature(target).parameters:
        kwargs["device"] = device
    try:
        scorer = target(**kwargs)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"reward '{name}' cannot be constructed ({_first_line(err)})") from err
    return UserReward(name, scorer)
