"""RankE from Python: every recipe is a function of a config and the user's own objects.

    import ranke

    cfg = ranke.load_config("toy")            # a preset, a YAML file; or a RunConfig you build
    cfg.posttrain.steps = 20
    result = ranke.posttrain(cfg, "runs/mine", rewards={"brightness": brightness}, prompts=[...])
    result.run_dir, result.metrics

Each function takes a config (a `RunConfig`, a bundled preset name or a YAML file; `overrides`
are `key=value` strings as on the command line, applied on top) and the run directory, and runs
the same recipe as the command of the same name: progress bars, checkpoints, the run-folder lock,
stop signals and `resume=True` behave as there, and `ranke <command>` calls these functions. Bad
input raises `ranke.runtime.UserError` with the line the command line prints. A stop signal
raises `ranke.runtime.Stopped` once the run's checkpoint is written. The run folder's lock is
given back when the call returns or raises.

`posttrain` also takes the user's objects (`ranke.train.user_objects`): reward functions or
instances by name (their weights in `cfg.posttrain.rewards`), a prompt list or prompt source and a
backbone. The run's config.yaml records them (its `objects` section), so a resume needs the same.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ranke import config as config_lib
from ranke.backbones import Backbone
from ranke.config import RunConfig
from ranke.data import PromptSource
from ranke.runlock import is_held, release
from ranke.runtime import UserError
from ranke.train.user_objects import UserObjects


@dataclass
class RunResult:
    """What a recipe leaves: its run directory, the last record of its metrics log and its own summary."""

    run_dir: Path
    metrics: dict  # the last line of RUN/metrics.jsonl (the final step's figures); {} when it has none
    summary: dict = field(default_factory=dict)  # the recipe's result: its evaluation, final checkpoint, assets


def load_config(config: str | Path = "toy", *overrides: str, section: str | None = None) -> RunConfig:
    """The `RunConfig` of a bundled preset name or YAML file with `key=value` overrides (a bare key
    belongs to `section`, e.g. "posttrain"); change its fields and give it to a recipe, which
    checks it again."""
    return config_lib.load(RunConfig, str(config), list(overrides), section=section)


def last_records(path: Path) -> list[dict]:
    """The records of a JSON-lines log that share its last record's step ([] without the file)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [record for record in records if record.get("step") == records[-1].get("step")] if records else []


def run_result(out: str | Path, summary: dict) -> RunResult:
    """The run in `out` after its recipe returned `summary`."""
    last = last_records(Path(out) / "metrics.jsonl")
    return RunResult(run_dir=Path(out), metrics=last[-1] if last else {}, summary=summary)


@contextlib.contextmanager
def run_folder(out: str | Path):
    """Around a recipe: the run folder's lock, which the recipe takes, is given back when the call
    ends (as the command's exit gives it back), unless this process held it before the call."""
    held_before = is_held(out)
    try:
        yield
    finally:
        if not held_before:
            release(out)


def posttrain(
    config: RunConfig | str | Path,
    out: str | Path,
    *,
    overrides: list[str] = (),
    rewards: dict[str, Callable] | None = None,
    prompts: list[str] | PromptSource | None = None,
    backbone: Backbone | None = None,
    resume: bool = False,
) -> RunResult:
    """`ranke posttrain`: GRPO policy stage and RankE decoder stage (docs/posttrain.md).

    rewards: reward objects by name, each a function or instance scoring images [B, 3, H, W] in
    [0, 1] against B prompts with B finite floats (`ranke.rewards.protocol`), probed before the run
    starts; their weights are `cfg.posttrain.rewards[name]`. prompts: toy-grammar prompts (the
    toy world renders each one's real image) or a `ranke.data.PromptSource` (prompts with real
    images). backbone: a `ranke.backbones.Backbone` to start from instead of `cfg.backbone`'s; it
    trains in place."""
    from ranke.train.posttrain import train_posttrain

    objects = UserObjects(rewards=rewards or {}, prompts=prompts, backbone=backbone)
    # what this call was given replaces the config's record; without objects the record stands,
    # so that a config that records some (a Python run's config.yaml) asks for them
    recorded = objects.described() if objects.given else None
    cfg = config_lib.load(RunConfig, _config(config), list(overrides), section="posttrain", objects=recorded)
    with run_folder(out):
        summary = train_posttrain(cfg, str(out), resume=resume, objects=objects)
    evaluation = last_records(Path(out) / "eval.jsonl")  # the held-out evaluation of the last step, by decoder
    return run_result(out, {**summary, "evaluation": evaluation} if evaluation else summary)


def sft(config: RunConfig | str | Path, out: str | Path, *, overrides: list[str] = (), resume: bool = False) -> RunResult:
    """`ranke sft`: supervised training of the policy on tokenizer codes; the summary is its verifier evaluation."""
    from ranke.train.sft import train_sft

    with run_folder(out):
        return run_result(out, train_sft(_config(config), str(out), list(overrides), resume=resume))


def train_tokenizer(
    config: RunConfig | str | Path, out: str | Path, *, overrides: list[str] = (), resume: bool = False
) -> RunResult:
    """`ranke train-tokenizer`: a VQ tokenizer; the summary is its PSNR and codebook usage."""
    from ranke.train.tokenizer import train_tokenizer as train

    with run_folder(out):
        return run_result(out, train(_config(config), str(out), list(overrides), resume=resume))


def train_reward(config: RunConfig | str | Path, out: str | Path, *, overrides: list[str] = ()) -> RunResult:
    """`ranke train-reward`: the toy world's judges (reward CLIP, evaluation CLIP, feature
    network); the summary maps each to its held-out figures and asset (each logs in RUN/<name>)."""
    from ranke.train.judges import train_judges

    with run_folder(out):
        return run_result(out, train_judges(_config(config), str(out), list(overrides)))


def _config(config: RunConfig | str | Path) -> RunConfig | str:
    """A config as the recipes take it: a `RunConfig`, or a preset name or YAML path as text."""
    if isinstance(config, RunConfig):
        return config
    if not isinstance(config, (str, Path)):
        raise UserError(f"config is a {type(config).__name__}; give a RunConfig (ranke.load_config), a preset name or a YAML path")
    return str(config)
