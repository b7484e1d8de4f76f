"""The Python API (`ranke.api`, re-exported as `ranke.posttrain` ...): the README's example runs as
written; the user's reward objects, prompt list, prompt source and backbone are what the run uses;
a run stopped by a signal and resumed through the API ends bit-identical to a straight run and
needs the same objects to resume; every bad object is one `UserError` line, with nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_posttrain import TINY
from test_recipes import TINY_TOKENIZER

import ranke
from ranke.backbones import load_toy_backbone
from ranke.checkpoint import latest_checkpoint, load_checkpoint
from ranke.cli import main
from ranke.rewards.user import PROBE_PROMPTS
from ranke.runtime import Stopped, UserError
from ranke.toy.data import render_caption

README = Path(__file__).parents[1] / "README.md"
PROMPT = "a large red circle"


def redness(images, prompts):
    """Each image's mean red channel."""
    return images[:, 0].mean(dim=(1, 2))


class RecordingReward:
    """A reward object scoring redness that keeps every batch of prompts and scores it is given,
    and sends this process `signal_at` (a stop signal) on its `signal_on_call`-th call."""

    def __init__(self, signal_on_call: int | None = None, signal_at: signal.Signals = signal.SIGUSR1):
        self.prompts, self.scores = [], []
        self.signal_on_call, self.signal_at = signal_on_call, signal_at

    def __call__(self, images, prompts):
        self.prompts.append(list(prompts))
        self.scores.append(redness(images, prompts))
        if len(self.prompts) == self.signal_on_call:
            os.kill(os.getpid(), self.signal_at)
        return self.scores[-1]


class CyclingPrompts:
    """A user's prompt source (the `ranke.data.PromptSource` protocol): its prompts in turn, each
    with a rendered real image; its position is its checkpointed state."""

    def __init__(self, prompts: list[str]):
        self.prompts, self.position = prompts, 0

    def next_batch(self, batch_size: int):
        picked = [self.prompts[(self.position + i) % len(self.prompts)] for i in range(batch_size)]
        self.position += batch_size
        pixels = np.stack([render_caption(prompt, np.random.default_rng(i)) for i, prompt in enumerate(picked)])
        return picked, torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def tiny_config(*overrides: str):
    cfg = ranke.load_config("toy", *TINY, "grid_every=100", *overrides, section="posttrain")
    cfg.posttrain.rewards = {"red": 1.0}
    return cfg


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, one_thread):
    example = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    assert 3 <= len(example.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(example, str(README), "exec"), namespace)

    result, run = namespace["result"], tmp_path / "runs" / "notebook"
    assert result.run_dir == Path("runs/notebook") and (run / "checkpoints" / "step_000002" / "manifest.json").is_file()
    assert result.metrics == records(run)[-1] and result.metrics["step"] == 2
    assert result.summary["checkpoint"] == str(Path("runs/notebook/checkpoints/step_000002"))
    assert {record["decoder"] for record in result.summary["evaluation"]} == {"ema", "online"}
    objects = yaml.safe_load((run / "config.yaml").read_text())["objects"]
    assert objects["rewards"] == {"brightness": "__main__.brightness"}
    assert objects["prompts"].startswith("list of 2 prompts, sha256 ")


def test_reward_object_and_prompt_list_are_what_the_run_uses(tmp_path, one_thread):
    reward, run = RecordingReward(), tmp_path / "run"
    result = ranke.posttrain(tiny_config("mode=policy", "steps=2"), run, rewards={"red": reward}, prompts=[PROMPT])
    # the probe first, then one batch per step: 2 prompts x group 2, every one from the list
    assert reward.prompts == [list(PROBE_PROMPTS), [PROMPT] * 4, [PROMPT] * 4]
    logged = [record["reward/red_mean"] for record in records(run)]
    assert logged == pytest.approx([float(scores.mean()) for scores in reward.scores[1:]], abs=1e-6)
    assert result.metrics["reward/red_mean"] == logged[-1]
    objects = yaml.safe_load((run / "config.yaml").read_text())["objects"]
    digest = hashlib.sha256(PROMPT.encode()).hexdigest()[:16]
    assert objects == {"rewards": {"red": "test_api.RecordingReward instance"},
                       "prompts": f"list of 1 prompts, sha256 {digest}", "backbone": None}  # fmt: skip


def test_prompt_source_and_backbone_objects_are_what_the_run_uses(tmp_path, one_thread):
    cfg = tiny_config("mode=policy", "steps=2", "save_every=1")
    backbone, cfg = load_toy_backbone(None, None, "cpu", run_cfg=cfg)
    start = {name: value.clone() for name, value in backbone.policy.state_dict().items()}
    source, reward, run = CyclingPrompts([PROMPT, "a small blue square"]), RecordingReward(), tmp_path / "run"
    ranke.posttrain(cfg, run, rewards={"red": reward}, prompts=source, backbone=backbone)
    assert reward.prompts[1:] == [[PROMPT] * 2 + ["a small blue square"] * 2] * 2  # groups of the cycled prompts
    _, trainer_state, _ = load_checkpoint(run / "checkpoints" / "step_000001")
    assert trainer_state["data"] == {"position": 2}  # the source's own state, checkpointed
    trained = load_file(run / "checkpoints" / "step_000002" / "policy.safetensors")
    assert all(torch.equal(trained[name], value) for name, value in backbone.policy.state_dict().items())
    assert not all(torch.equal(trained[name], value) for name, value in start.items())  # it trained in place
    objects = yaml.safe_load((run / "config.yaml").read_text())["objects"]
    assert objects["prompts"] == "test_api.CyclingPrompts instance"
    assert objects["backbone"].startswith("ranke.backbones.base.Backbone instance (policy ")


def test_run_stopped_by_a_signal_resumes_through_the_api_bit_identically(tmp_path, capsys, one_thread):
    cfg = tiny_config("mode=both", "steps=4", "disc_start=1", "save_every=4", "policy_ema_every=2")
    ranke.posttrain(cfg, tmp_path / "straight", rewards={"red": RecordingReward()}, prompts=[PROMPT])

    resumed = tmp_path / "resumed"
    with pytest.raises(Stopped, match="stopped by SIGUSR1 after step 2"):  # the probe is call 1, step 2's rollout call 3
        ranke.posttrain(cfg, resumed, rewards={"red": RecordingReward(signal_on_call=3)}, prompts=[PROMPT])
    assert latest_checkpoint(resumed).name == "step_000002"
    # the resume needs the same objects: another reward, or none (the command line), is refused
    with pytest.raises(UserError, match="--resume cannot change objects .* resume it from Python with the same ones"):
        ranke.posttrain(cfg, resumed, rewards={"red": redness}, prompts=[PROMPT], resume=True)
    for config, refusal in ((resumed / "config.yaml", "the config records reward 'red' (test_api.RecordingReward "
                             "instance) given as a Python object, which the command line cannot give"),
                            ("toy", "--resume cannot change objects")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_code:
            main(["posttrain", "--config", str(config), "--out", str(resumed), "--resume", *TINY])
        assert exit_code.value.code == 2 and refusal in capsys.readouterr().err
    ranke.posttrain(cfg, resumed, rewards={"red": RecordingReward()}, prompts=[PROMPT], resume=True)

    for stem in ("policy", "policy_ema", "vq", "vq_ema", "discriminator"):
        straight = (tmp_path / "straight" / "checkpoints" / "step_000004" / f"{stem}.safetensors").read_bytes()
        assert straight == (resumed / "checkpoints" / "step_000004" / f"{stem}.safetensors").read_bytes(), stem
    untimed = lambda run: [{k: v for k, v in row.items() if not k.startswith("time/")} for row in records(run) if "stopped" not in row]  # noqa: E731
    assert untimed(resumed) == untimed(tmp_path / "straight")


def wrong_shape(images, prompts):
    return torch.zeros(images.shape[0], 1)


@pytest.mark.parametrize(
    "given, message",
    [
        ({"rewards": [redness]}, "rewards must be a dict of reward objects by name"),
        ({"rewards": {"red": 3}}, "reward object 'red' is a int, not a function or an object with __call__"),
        ({"rewards": {"red": RecordingReward}}, "reward object 'red' is the class RecordingReward; pass an instance"),
        ({"rewards": {"blue": redness}}, "the reward object 'blue' has no weight: name it in posttrain.rewards"),
        ({"rewards": {"red": wrong_shape}}, "reward 'red' returned shape (2, 1), expected (2,): one score per image"),
        ({"prompts": PROMPT}, "prompts is one string; give a list of prompts"),
        ({"prompts": []}, "prompts must be a non-empty list of non-empty strings"),
        ({"prompts": ["a red circle"]}, "prompts given from Python: cannot parse caption 'a red circle'"),
        ({"prompts": {"a": 1}}, "prompts is a dict: neither a list of strings nor a prompt source"),
        ({"backbone": "toy"}, "backbone is a str, not a ranke.backbones.Backbone"),
        ({"config": {"posttrain": {}}}, "config is a dict; give a RunConfig"),
        ({"overrides": ["rewards={toy_clip: 1.0}"]}, "the reward object 'red' has no weight"),
    ],
)
def test_bad_object_is_one_user_error_and_writes_nothing(tmp_path, given, message):
    arguments = {"rewards": {"red": redness}, "config": tiny_config("mode=policy", "steps=1"), **given}
    with pytest.raises(UserError) as error:
        ranke.posttrain(arguments.pop("config"), tmp_path / "run", **arguments)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_builtin_reward_name_cannot_be_an_object(tmp_path):
    cfg = tiny_config()
    cfg.posttrain.rewards = {"toy_clip": 1.0}
    with pytest.raises(UserError, match="the reward object 'toy_clip' needs a name of its own"):
        ranke.posttrain(cfg, tmp_path / "run", rewards={"toy_clip": redness})


@pytest.mark.parametrize("recipe, settings", [
    ("train_tokenizer", [*TINY_TOKENIZER, "tokenizer.steps=2", "log_with=none"]),
    ("sft", ["sft.batch_size=4", "sft.steps=2", "sft.grid_every=100", "sft.eval_samples=2", "sft.eval_prompts=2", "log_with=none"]),
])  # fmt: skip
def test_each_recipe_returns_its_run_directory_metrics_and_evaluation(tmp_path, recipe, settings, one_thread):
    result = getattr(ranke, recipe)(ranke.load_config("toy", *settings), tmp_path / "run")
    assert result.run_dir == tmp_path / "run" and result.metrics == records(tmp_path / "run")[-1]
    assert result.metrics["step"] == 2
    assert result.summary == json.loads((tmp_path / "run" / "eval.json").read_text())
