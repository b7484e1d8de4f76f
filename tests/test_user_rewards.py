"""The reward protocol (`ranke.rewards.protocol`) and rewards from the user's code, named
`package.module:attribute` (`ranke.rewards.user`): the contract checked with one line naming the
reward, the built-ins keeping it, docs/posttrain.md's examples run as written, a toy run trained
with a reward from a file outside the package, and a broken one stopped before config.yaml."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_posttrain import TINY
from test_rewards import tiny_clip_dir  # noqa: F401 (a fixture)

from ranke.cli import main
from ranke.config import CONFIG_DIR
from ranke.rewards.build import build_reward
from ranke.rewards.protocol import Reward, check_scores
from ranke.rewards.user import UserReward, build_user_reward
from ranke.runtime import UserError
from ranke.train.posttrain import train_posttrain

DOCS = Path(__file__).parents[1] / "docs" / "posttrain.md"
BROKEN = '''
import torch

def wrong_shape(images, prompts):
    return torch.zeros(images.shape[0], 1)

def nan(images, prompts):
    return torch.full((images.shape[0],), float("nan"))

def raises(images, prompts):
    raise RuntimeError("the scorer fell over")

def integers(images, prompts):
    return torch.zeros(images.shape[0], dtype=torch.long)

not_callable = 3
'''


def docs_module(name: str) -> str:
    """The ```python block of docs/posttrain.md that starts with `# <name>.py`."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    return next(block for block in blocks if block.startswith(f"# {name}.py\n"))


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """`write(name, source)`: module `name` in a folder outside the package, on sys.path for the test."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    written = []

    def write(name: str, source: str) -> str:
        (folder / f"{name}.py").write_text(source)
        sys.modules.pop(name, None)
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def _images(batch: int, size: int = 8) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "scores, message",
    [
        (torch.zeros(3, 1), "returned shape (3, 1), expected (3,)"),
        (torch.zeros(2), "returned shape (2,), expected (3,)"),
        (torch.zeros(3, dtype=torch.long), "returned dtype torch.int64, expected a floating-point tensor"),
        (torch.tensor([0.0, math.nan, 1.0]), "returned 1 non-finite score(s) (NaN or inf) of 3"),
        (torch.tensor([0.0, math.inf, -math.inf]), "returned 2 non-finite score(s)"),
        ([0.0, 1.0, 2.0], "returned list, not a torch.Tensor of 3 scores"),
    ],
)
def test_check_scores_names_the_reward_and_what_is_wrong(scores, message):
    with pytest.raises(UserError) as err:
        check_scores("mine", scores, 3)
    assert str(err.value).startswith("reward 'mine' ") and message in str(err.value)


def test_check_scores_passes_a_good_batch_and_nan_when_allowed():
    good = torch.tensor([0.5, -1.0, 2.0])
    assert check_scores("mine", good, 3) is good
    check_scores("mine", torch.tensor([math.nan, 0.0, 0.0]), 3, finite=False)


@pytest.mark.parametrize("name", ["toy_clip", "colorfulness", "verifier"])
def test_builtins_keep_the_protocol(name):
    reward = build_reward({name: 1.0}).terms[0].reward
    images = _images(4, 64)
    assert isinstance(reward, Reward)
    check_scores(name, reward(images, ["a small red circle"] * 4), 4)


def test_a_function_is_wrapped_with_its_optional_attributes(user_code):
    user_code("fn_reward", "calls = []\ndef score(images, prompts):\n    calls.append(len(prompts))\n"
                           "    return images.mean(dim=(1, 2, 3))\nscore.batch_size = 2\n")  # fmt: skip
    reward = build_user_reward("fn_reward:score", "cpu", {})
    images = _images(5)
    assert torch.allclose(reward(images, ["p"] * 5), images.mean(dim=(1, 2, 3)))
    assert sys.modules["fn_reward"].calls == [2, 2, 1] and not reward.differentiable


def test_a_class_is_constructed_with_the_device_and_its_args(user_code):
    user_code("class_reward", "import torch\nclass Offset:\n    differentiable = True\n"
                              "    def __init__(self, device, offset=0.0):\n        self.device, self.offset = device, offset\n"
                              "    def __call__(self, images, prompts):\n        return images.mean(dim=(1, 2, 3)) + self.offset\n")  # fmt: skip
    reward = build_user_reward("class_reward:Offset", torch.device("cpu"), {"offset": 2.0})
    assert reward.scorer.device == torch.device("cpu") and reward.differentiable
    images = _images(3)
    assert torch.allclose(reward(images, ["p"] * 3), images.mean(dim=(1, 2, 3)) + 2.0)
    with pytest.raises(UserError, match="cannot be constructed \\(TypeError: "):
        build_user_reward("class_reward:Offset", "cpu", {"scale": 2.0})


@pytest.mark.parametrize(
    "attribute, message",
    [
        ("wrong_shape", "reward 'broken:wrong_shape' returned shape (2, 1), expected (2,)"),
        ("nan", "reward 'broken:nan' returned 2 non-finite score(s)"),
        ("raises", "reward 'broken:raises' raised RuntimeError: the scorer fell over"),
        ("integers", "reward 'broken:integers' returned dtype torch.int64"),
    ],
)
def test_a_broken_reward_is_one_line(user_code, attribute, message):
    user_code("broken", BROKEN)
    with pytest.raises(UserError) as err:
        build_user_reward(f"broken:{attribute}", "cpu", {})(_images(2), ["a", "b"])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name, message",
    [
        ("no_such_module_xyz:score", "module 'no_such_module_xyz' cannot be imported (ModuleNotFoundError"),
        ("broken:missing", "module 'broken' ("),
        ("broken:not_callable", "reward 'broken:not_callable' is a int, not a function or class"),
        (":score", "must be written package.module:attribute"),
    ],
)
def test_a_name_that_does_not_resolve_is_one_line(user_code, name, message):
    user_code("broken", BROKEN)
    with pytest.raises(UserError, match=re.escape(message)):
        build_reward({name: 1.0})


def test_docs_pixel_statistic_is_differentiable_and_prompt_blind(user_code):
    user_code("my_rewards", docs_module("my_rewards"))
    combined = build_reward({"my_rewards:contrast": 1.0})
    assert combined.differentiable
    images = _images(3).requires_grad_(True)
    scores = combined.terms[0].reward(images, ["a", "b", "c"])
    assert torch.equal(scores, combined.terms[0].reward(images, ["x", "y", "z"]))
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert combined.terms[0].reward(flat, ["a"]).item() == pytest.approx(0.0, abs=1e-4)


def test_docs_pickscore_on_a_tiny_clip(user_code, tiny_clip_dir):  # noqa: F811
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    processor = CLIPProcessor(
        CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}),
        CLIPTokenizer.from_pretrained(tiny_clip_dir),
    )
    processor.save_pretrained(tiny_clip_dir)
    user_code("pickscore", docs_module("pickscore"))
    reward = build_reward({"pickscore:PickScore": 1.0}, settings=_args({"pickscore:PickScore": {"path": str(tiny_clip_dir)}}))
    scorer = reward.terms[0].reward
    assert isinstance(scorer, UserReward) and scorer.batch_size == 16 and not reward.differentiable
    images, prompts = _images(3, 16), ["a red circle", "two squares", "a cat"]
    scores = scorer(images, prompts)
    # reference: the model's own logits_per_image, exp(logit_scale) * cosine, on the processor's inputs
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    inputs = processor(text=prompts, images=list(images), do_rescale=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.diagonal()
    assert torch.allclose(scores, expected, atol=1e-5)


def _args(args: dict):
    from ranke.rewards.build import RewardSettings

    return RewardSettings(args=args)


def test_toy_run_trains_with_a_reward_from_a_file_outside_the_package(user_code, tmp_path, one_thread):
    user_code("my_rewards", docs_module("my_rewards"))
    config = yaml.safe_load((CONFIG_DIR / "toy.yaml").read_text())
    config["posttrain"]["rewards"] = {"toy_clip": 1.0, "my_rewards:contrast": 0.5}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    train_posttrain(str(tmp_path / "mine.yaml"), str(run), [*TINY, "mode=both", "steps=2", "disc_start=0", "grid_every=100"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert all(math.isfinite(r["reward/my_rewards:contrast_mean"]) and r["reward/my_rewards:contrast_nonfinite"] == 0
               for r in records)  # fmt: skip
    assert all(r["decoder/reward_backprop"] != 0 for r in records)  # its gradient reaches the decoder
    assert yaml.safe_load((run / "config.yaml").read_text())["posttrain"]["rewards"]["my_rewards:contrast"] == 0.5


@pytest.mark.parametrize("attribute", ["wrong_shape", "nan", "raises"])
def test_a_broken_reward_stops_the_run_before_config_yaml(user_code, tmp_path, capsys, one_thread, attribute):
    user_code("broken", BROKEN)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["posttrain", "--out", str(run), *TINY, "steps=1", f"rewards={{broken:{attribute}: 1.0}}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"ranke: error: reward 'broken:{attribute}' ")
    assert [path.name for path in run.iterdir()] == [".lock"]


def test_a_reward_that_does_not_import_leaves_no_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["posttrain", "--out", str(run), "rewards={no_such_module_xyz:score: 1.0}"])
    assert exit_info.value.code == 2 and "cannot be imported" in capsys.readouterr().err
    assert not run.exists()
