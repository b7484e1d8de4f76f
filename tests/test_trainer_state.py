"""One trainer-state format for every recipe, with a version: checkpoints written before it
(each recipe's own names, no version) are read and resume bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_posttrain import TINY
from test_recipes import TINY_TOKENIZER, tiny_sft

from ranke import checkpoint as checkpoint_lib
from ranke.runtime import UserError, set_deterministic
from ranke.train.posttrain import train_posttrain
from ranke.train.sft import train_sft
from ranke.train.tokenizer import train_tokenizer
from ranke.train.trainer_state import TRAINER_STATE_VERSION, upgrade


def as_written_before_versions(state: dict, recipe: str) -> dict:
    """`state` in the layout the recipe wrote before the format had a version (commit 72efe8f)."""
    common = {"step": state["step"], "rng": state["rng"]}
    if recipe == "sft":
        return {**common, "optimizer": state["optimizers"]["policy"], "schedule": state["schedules"]["policy"],
                "guard": state["guards"]["policy"]}  # fmt: skip
    if recipe == "tokenizer":
        return {**common, "optimizer": state["optimizers"]["vq"], "optimizer_disc": state["optimizers"]["disc"],
                "schedule": state["schedules"]["vq"], "guards": state["guards"]}  # fmt: skip
    return {key: value for key, value in state.items() if key not in ("version", "schedules")}


def rewrite_as_before_versions(run: Path, step: int, recipe: str) -> None:
    """Make checkpoint `step` of `run` its latest, holding its trainer state in the old layout."""
    path = run / "checkpoints" / f"step_{step:06d}"
    tensors, state, config_yaml = checkpoint_lib.load_checkpoint(path)
    assert state["version"] == TRAINER_STATE_VERSION
    for later in (run / "checkpoints").glob("step_*"):
        if later.name > path.name:
            shutil.rmtree(later)
    checkpoint_lib.save_checkpoint(run, step, tensors, as_written_before_versions(state, recipe), config_yaml)


def test_upgrade_reads_each_recipes_unversioned_names():
    optimizer, schedule, guard, rng = {"state": {}}, {"last_epoch": 2}, {"total": 1, "consecutive": 0}, {"generators": {}}
    sft = upgrade({"step": 2, "optimizer": optimizer, "schedule": schedule, "guard": guard, "rng": rng}, "sft")
    assert sft == {"version": 2, "step": 2, "optimizers": {"policy": optimizer}, "schedules": {"policy": schedule},
                   "guards": {"policy": guard}, "rng": rng}  # fmt: skip
    tokenizer = upgrade({"step": 2, "optimizer": optimizer, "optimizer_disc": optimizer, "schedule": schedule,
                         "guards": {"vq": guard, "disc": guard}, "rng": rng}, "tokenizer")  # fmt: skip
    assert tokenizer["optimizers"] == {"vq": optimizer, "disc": optimizer} and tokenizer["schedules"] == {"vq": schedule}
    assert tokenizer["guards"] == {"vq": guard, "disc": guard}
    # post-training already had these names; its oldest checkpoints have no guards
    posttrain = upgrade({"step": 2, "optimizers": {"policy": optimizer}, "rng": rng, "data": {}}, "posttrain")
    assert posttrain == {"version": 2, "step": 2, "optimizers": {"policy": optimizer}, "rng": rng, "data": {},
                         "schedules": {}, "guards": {}}  # fmt: skip
    assert upgrade(posttrain, "posttrain") is posttrain
    with pytest.raises(UserError, match="trainer state has version 3"):
        upgrade({**posttrain, "version": 3}, "posttrain")


def assert_same_weights(a: Path, b: Path, step: int, stems: tuple[str, ...]) -> None:
    for stem in stems:
        name = f"checkpoints/step_{step:06d}/{stem}.safetensors"
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{stem} differs"


@pytest.mark.parametrize("recipe", ["tokenizer", "sft"])
def test_an_unversioned_tokenizer_or_sft_checkpoint_resumes_bit_identically(recipe, tmp_path, one_thread):
    set_deterministic(True)
    if recipe == "tokenizer":
        train, settings, stems = train_tokenizer, [*TINY_TOKENIZER, "tokenizer.steps=4", "log_with=none"], ("vq", "discriminator")
    else:
        train_tokenizer("toy", str(tmp_path / "tok"), [*TINY_TOKENIZER, "tokenizer.steps=1", "log_with=none"])
        settings = tiny_sft(tmp_path / "tok", "sft.steps=4", "sft.warmup_steps=1", "sft.eval_prompts=2",
                            "sft.eval_samples=2", "sft.save_every=2", "log_with=none")  # fmt: skip
        train, stems = train_sft, ("policy",)
    train("toy", str(tmp_path / "straight"), settings)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    rewrite_as_before_versions(tmp_path / "resumed", 2, recipe)
    train("toy", str(tmp_path / "resumed"), settings, resume=True)
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed", 4, stems)


def test_an_unversioned_posttrain_checkpoint_resumes_bit_identically(tmp_path, one_thread):
    settings = [*TINY, "mode=both", "steps=4", "disc_start=1", "save_every=2", "grid_every=100", "log_with=none"]
    train_posttrain("toy", str(tmp_path / "straight"), settings)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    rewrite_as_before_versions(tmp_path / "resumed", 2, "posttrain")
    train_posttrain("toy", str(tmp_path / "resumed"), settings, resume=True)
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed", 4, ("policy", "policy_ema", "vq", "vq_ema", "discriminator"))
    _, state, _ = checkpoint_lib.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_000004")
    assert state["version"] == TRAINER_STATE_VERSION  # what it writes after the resume is the current format
