"""The verifier reward: toy GenEval verdicts as a batched, non-differentiable reward."""

import numpy as np
import pytest
import torch

from ranke.rewards import Reward
from ranke.rewards.verifier import VerifierReward
from ranke.runtime import UserError
from ranke.toy.render import render_scene
from ranke.toy.scenes import Background, ObjectSpec, PlacedObject, Scene

GREY = Background("linear", (0.5, 0.5, 0.5), (0.7, 0.7, 0.7), angle=0.3)
RED_LEFT_OF_BLUE = Scene(
    (
        PlacedObject(ObjectSpec("circle", "red", "large"), 0.27, 0.5, 0.18),
        PlacedObject(ObjectSpec("square", "blue", "small"), 0.75, 0.5, 0.1),
    ),
    GREY,
    (0, "left of", 1),
)
YELLOW_TRIANGLE = Scene((PlacedObject(ObjectSpec("triangle", "yellow", "small"), 0.5, 0.5, 0.1),), GREY)


def _batch(*scenes, size: int = 64) -> torch.Tensor:
    images = np.stack([render_scene(scene, size) for scene in scenes])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def test_whole_prompt_correctness_is_one_or_zero_per_image():
    images = _batch(RED_LEFT_OF_BLUE, RED_LEFT_OF_BLUE, RED_LEFT_OF_BLUE, YELLOW_TRIANGLE)
    prompts = [
        "a large red circle to the left of a small blue square",
        "a small blue square to the right of a large red circle",  # the same request, converse phrasing
        "a large red circle to the right of a small blue square",  # relation wrong
        "a small yellow triangle",
    ]
    reward = VerifierReward()
    scores = reward(images, prompts)
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    assert scores.tolist() == [1.0, 1.0, 0.0, 1.0]


def test_object_accuracy_counts_matched_objects():
    images = _batch(RED_LEFT_OF_BLUE, RED_LEFT_OF_BLUE, YELLOW_TRIANGLE)
    prompts = [
        "a large red circle to the right of a small blue square",  # both objects found, relation wrong
        "a large red circle to the left of a small green square",  # one of two objects found
        "a small yellow circle",  # wrong shape
    ]
    scores = VerifierReward(metric="object_accuracy")(images, prompts)
    assert scores.tolist() == [1.0, 0.5, 0.0]
    assert VerifierReward()(images, prompts).tolist() == [0.0, 0.0, 0.0]


def test_other_resolutions_and_out_of_range_pixels():
    # the verifier works in image fractions: a 96 px render scores like a 64 px one
    images = _batch(YELLOW_TRIANGLE, size=96)
    assert VerifierReward()(images, ["one small yellow triangle"]).tolist() == [1.0]
    # decoder outputs can overshoot [0, 1]: they are clipped, not rejected
    overshoot = images * 1.2 - 0.1
    assert VerifierReward()(overshoot, ["one small yellow triangle"]).tolist() == [1.0]


def test_is_a_non_differentiable_reward_and_ignores_gradients():
    reward = VerifierReward(name="geneval")
    assert isinstance(reward, Reward)
    assert reward.name == "geneval" and reward.differentiable is False
    images = _batch(YELLOW_TRIANGLE).requires_grad_(True)
    scores = reward(images, ["a small yellow triangle"])
    assert not scores.requires_grad


def test_bad_inputs_fail_clearly():
    with pytest.raises(UserError, match="metric 'recall'"):
        VerifierReward(metric="recall")
    with pytest.raises(UserError, match="toy-world captions"):
        VerifierReward()(_batch(YELLOW_TRIANGLE), ["a photo of a cat"])
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        VerifierReward()(_batch(YELLOW_TRIANGLE), ["a small yellow triangle"] * 2)
