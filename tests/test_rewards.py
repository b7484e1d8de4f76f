"""Rewards: protocol, preprocessing, running statistics, combination, CLIP and HPSv2 scorers."""

from __future__ import annotations

import json
import math
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ranke.rewards import CLIPReward, CombinedReward, HPSv2Reward, Reward, RunningStats
from ranke.rewards.base import resize_center_crop
from ranke.rewards.build import build_reward
from ranke.rewards.colorfulness import ColorfulnessReward, colorfulness
from ranke.runtime import UserError


class ListReward:
    """Returns preset scores, one list per call, ignoring the images."""

    differentiable = False

    def __init__(self, name: str, batches: list[list[float]]):
        self.name = name
        self.batches = iter(batches)

    def __call__(self, images, prompts):
        return torch.tensor(next(self.batches), dtype=torch.float32)


class BrightnessReward:
    """Mean pixel value: a differentiable reward with a known gradient (1 / (3 H W) per pixel)."""

    name = "brightness"
    differentiable = True

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def _images(batch: int = 3, size: int = 4) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


# --- preprocessing -----------------------------------------------------------------------------


def test_resize_center_crop_matches_pil_bicubic_then_center_crop():
    rng = np.random.default_rng(0)
    image = rng.random((3, 12, 20)).astype(np.float32)
    # PIL reference per channel: shorter side 12 -> 6, longer 20 -> int(6 * 20 / 12) = 10, crop columns 2..7.
    expected = np.stack([np.asarray(Image.fromarray(c, mode="F").resize((10, 6), Image.BICUBIC)) for c in image])
    expected = expected[:, :, 2:8]
    result = resize_center_crop(torch.from_numpy(image)[None], 6)[0].numpy()
    assert result.shape == (3, 6, 6)
    np.testing.assert_allclose(result, expected, atol=1e-5)


def test_resize_center_crop_only_crops_when_shorter_side_fits():
    image = torch.arange(2 * 3 * 4 * 7, dtype=torch.float32).view(2, 3, 4, 7)
    torch.testing.assert_close(resize_center_crop(image, 4), image[..., 1:5])


# --- running statistics ------------------------------------------------------------------------


def test_running_stats_equal_moments_of_all_values():
    rng = np.random.default_rng(1)
    batches = [rng.normal(30.0, 3.0, size=n) for n in (5, 1, 17, 8)]
    stats = RunningStats()
    for batch in batches:
        stats.update(torch.from_numpy(batch).float())
    everything = np.concatenate([b.astype(np.float32).astype(np.float64) for b in batches])
    assert stats.count == everything.size
    assert stats.mean == pytest.approx(everything.mean(), rel=1e-12)
    assert stats.var == pytest.approx(everything.var(), rel=1e-10)


def test_running_stats_identity_before_any_value_and_state_round_trip():
    stats = RunningStats()
    values = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(stats.normalize(values, eps=0.0), values)
    stats.update(values)
    restored = RunningStats()
    restored.load_state_dict(json.loads(json.dumps(stats.state_dict())))
    stats.update(torch.tensor([10.0]))
    restored.update(torch.tensor([10.0]))
    assert restored.state_dict() == stats.state_dict()
    assert stats.mean == pytest.approx(4.0) and stats.var == pytest.approx(12.5)  # values 1, 2, 3, 10


def test_running_stats_reduce_sum_merges_the_global_batch():
    # Two processes holding the same batch: the all-reduced update counts every value twice.
    stats = RunningStats()
    stats.update(torch.tensor([1.0, 2.0, 3.0]), reduce_sum=lambda sums: 2 * sums)
    assert stats.count == 6 and stats.mean == pytest.approx(2.0) and stats.var == pytest.approx(2 / 3)


# --- combination -------------------------------------------------------------------------------


def test_combined_without_normalisation_is_the_weighted_sum():
    combined = CombinedReward([(ListReward("a", [[1.0, 2.0]]), 0.5), (ListReward("b", [[10.0, -4.0]]), 2.0)],
                              normalize=False)
    out = combined(_images(2), ["x", "y"])
    torch.testing.assert_close(out.total, torch.tensor([20.5, -7.0]))
    torch.testing.assert_close(out.components["b"], torch.tensor([10.0, -4.0]))
    assert out.nonfinite == {"a": 0, "b": 0}


def test_combined_updates_statistics_before_normalising():
    combined = CombinedReward([(ListReward("a", [[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]]), 2.0)], eps=0.0)
    first = combined(_images(), ["p"] * 3)
    # The first batch is normalised by its own moments: mean 2, population std sqrt(2/3).
    torch.testing.assert_close(first.total, 2.0 * torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3))
    second = combined(_images(), ["p"] * 3)
    # Now over 1, 2, 3, 4, 4, 4: mean 3, variance 8/6.
    torch.testing.assert_close(second.total, torch.full((3,), 2.0 / math.sqrt(8 / 6)))


def test_combined_update_stats_false_leaves_statistics_alone():
    combined = CombinedReward([(ListReward("a", [[1.0, 3.0], [5.0, 5.0]]), 1.0)], eps=0.0)
    combined(_images(2), ["p", "q"])
    before = combined.state_dict()
    out = combined(_images(2), ["p", "q"], update_stats=False)
    assert combined.state_dict() == before
    torch.testing.assert_close(out.total, torch.tensor([3.0, 3.0]))  # (5 - 2) / 1


def test_combined_excludes_non_finite_values_and_warns_once():
    reward = ListReward("a", [[1.0, float("nan"), 3.0], [float("inf"), 2.0, 2.0]])
    combined = CombinedReward([(reward, 1.0), (ListReward("b", [[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]]), 1.0)], eps=0.0)
    with pytest.warns(RuntimeWarning, match="reward 'a' returned 1 non-finite"):
        out = combined(_images(), ["p"] * 3)
    assert out.nonfinite == {"a": 1, "b": 0}
    assert torch.isnan(out.components["a"][1])
    # a: stats over {1, 3} -> [-1, excluded, 1]; b: mean 1, std sqrt(2/3).
    b_norm = torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3)
    torch.testing.assert_close(out.total, torch.tensor([-1.0, 0.0, 1.0]) + b_norm)
    assert combined.stats["a"].count == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = combined(_images(), ["p"] * 3)
    assert out.nonfinite["a"] == 1 and torch.isfinite(out.total).all()
    assert combined.stats["a"].count == 4


def test_combined_passes_gradients_of_differentiable_components():
    images = _images().requires_grad_(True)
    combined = CombinedReward([(BrightnessReward(), 3.0), (ListReward("const", [[1.0, 2.0, 3.0]]), 1.0)],
                              normalize=False)
    assert combined.differentiable
    combined(images, ["p"] * 3).total.sum().backward()
    torch.testing.assert_close(images.grad, torch.full_like(images, 3.0 / (3 * 4 * 4)))


def test_differentiable_score_is_the_weighted_raw_sum_of_differentiable_components():
    images = _images().requires_grad_(True)
    combined = CombinedReward([(BrightnessReward(), 3.0), (ListReward("const", [[5.0, 5.0, 5.0]]), 1.0)])
    score = combined.differentiable_score(images, ["p"] * 3)  # raw: the running statistics play no part
    torch.testing.assert_close(score, 3.0 * images.mean(dim=(1, 2, 3)))
    score.sum().backward()
    torch.testing.assert_close(images.grad, torch.full_like(images, 3.0 / (3 * 4 * 4)))
    assert CombinedReward([(ListReward("const", []), 1.0)]).differentiable_score(images, ["p"] * 3) is None


def test_combined_rejects_duplicate_names_and_mismatched_state():
    with pytest.raises(ValueError, match="unique"):
        CombinedReward([(BrightnessReward(), 1.0), (BrightnessReward(), 1.0)])
    combined = CombinedReward([(BrightnessReward(), 1.0)])
    with pytest.raises(ValueError, match="cannot be loaded"):
        combined.load_state_dict({"clip": RunningStats().state_dict()})


# --- CLIP --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A randomly initialised tiny CLIP with a character-level CLIP tokenizer, saved offline."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    directory = tmp_path_factory.mktemp("tiny_clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt")).save_pretrained(directory)
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=8, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(directory)
    processor = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "size": {"shortest_edge": 8},
                 "crop_size": {"height": 8, "width": 8}}
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    return directory


def test_clip_reward_is_100_times_cosine_of_the_hf_model(tiny_clip_dir):
    reward = CLIPReward(tiny_clip_dir)
    assert isinstance(reward, Reward) and reward.differentiable
    images = _images(2, 8)
    prompts = ["a red circle", "two blue squares"]
    scores = reward(images, prompts)
    # Reference: the HF forward pass, whose logits are exp(logit_scale) * cosine.
    tokens = reward.tokenizer(prompts, padding=True, return_tensors="pt")
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = reward.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                           pixel_values=(images - mean) / std)
    expected = 100.0 * out.logits_per_image.diagonal() / reward.model.logit_scale.exp()
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-4)
    assert scores.abs().max() <= 100.0


def test_clip_reward_refuses_a_damaged_preprocessor_config_with_one_line(tiny_clip_dir, tmp_path):
    import shutil

    broken = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, broken)
    (broken / "preprocessor_config.json").write_text('{"image_mean": [0.5')
    with pytest.raises(UserError, match=r"CLIP preprocessor config '.*' is not valid JSON \(line 1: "):
        CLIPReward(broken)
    (broken / "preprocessor_config.json").write_text('{"size": 8}')
    with pytest.raises(UserError, match="has no image_mean / image_std"):
        CLIPReward(broken)


def test_clip_reward_prefix_gradients_and_text_cache(tiny_clip_dir):
    plain = CLIPReward(tiny_clip_dir)
    prefixed = CLIPReward(tiny_clip_dir, prefix="a photo depicts")
    images = _images(2, 16).requires_grad_(True)  # 16 px: exercises the resize to 8 px
    scores = prefixed(images, ["a cat", "a dog"])
    torch.testing.assert_close(scores, plain(images, ["a photo depicts a cat", "a photo depicts a dog"]))
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0

    calls = []
    original = prefixed.encode_text
    prefixed.encode_text = lambda prompts: calls.append(list(prompts)) or original(prompts)
    prefixed(images.detach(), ["a cat", "a cow"])
    assert calls == [["a cow"]]  # "a cat" came from the cache


def test_clip_reward_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found or incomplete"):
        CLIPReward(tmp_path / "nowhere")


# --- HPSv2 -------------------------------------------------------------------------------------


def test_hpsv2_without_open_clip_asks_for_the_extra(monkeypatch, tmp_path):
    # None in sys.modules makes the import fail, whether or not the packages are installed.
    monkeypatch.setitem(sys.modules, "open_clip", None)
    monkeypatch.setitem(sys.modules, "hpsv2", None)
    with pytest.raises(UserError, match=r"pip install 'ranke\[hpsv2\]'"):
        HPSv2Reward(tmp_path / "HPS_v2.1_compressed.pt")


class _FakeOpenCLIP(torch.nn.Module):
    """Stands in for an OpenCLIP model: linear encoders over pooled pixels and token counts."""

    def __init__(self):
        super().__init__()
        self.visual = types.SimpleNamespace(image_size=(4, 4))
        self.image_proj = torch.nn.Linear(3, 5)
        self.text_proj = torch.nn.Linear(1, 5)

    def encode_image(self, pixels):
        return self.image_proj(pixels.mean(dim=(2, 3)))

    def encode_text(self, tokens):
        return self.text_proj(tokens.float())


@pytest.fixture
def fake_open_clip(monkeypatch):
    module = types.ModuleType("open_clip")
    module.create_model = lambda name, pretrained=None: _FakeOpenCLIP()
    module.get_tokenizer = lambda name: (lambda texts: torch.tensor([[float(len(t))] for t in texts]))
    monkeypatch.setitem(sys.modules, "open_clip", module)
    return module


def test_hpsv2_missing_checkpoint_is_a_user_error(fake_open_clip, tmp_path):
    with pytest.raises(UserError, match="HPSv2 checkpoint .* not found"):
        HPSv2Reward(tmp_path / "HPS_v2.1_compressed.pt")


def test_hpsv2_scores_plain_cosine_with_openai_normalisation(fake_open_clip, tmp_path):
    torch.manual_seed(0)
    source = _FakeOpenCLIP()
    checkpoint = tmp_path / "hps.pt"
    torch.save({"state_dict": source.state_dict()}, checkpoint)
    reward = HPSv2Reward(checkpoint)
    images = _images(2, 4).requires_grad_(True)
    scores = reward(images, ["ab", "abc"])
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        image_features = source.encode_image((images - mean) / std)
        text_features = source.encode_text(torch.tensor([[2.0], [3.0]]))
    expected = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    torch.testing.assert_close(scores, expected)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0


# --- colorfulness --------------------------------------------------------------------------------


def test_colorfulness_matches_hand_computation():
    """Hasler and Suesstrunk on [0, 1] pixels, x100. A flat pure red image: rg = 1, yb = 0.5, no
    spread, so M = 100 * 0.3 * sqrt(1 + 0.25) = 33.541. Half pure red, half black: rg is 1 or 0
    (mean 0.5, population std 0.5), yb is 0.5 or 0 (mean 0.25, std 0.25), so
    M = 100 * (sqrt(0.25 + 0.0625) + 0.3 * sqrt(0.25 + 0.0625)) = 130 * 0.559017 = 72.672."""
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    half = red.clone()
    half[:, :, :, 1] = 0.0
    grey = torch.full((1, 3, 2, 2), 0.4)
    scores = colorfulness(torch.cat([red, half, grey]))
    assert scores.tolist() == pytest.approx([33.5410, 72.6722, 0.0], abs=2e-3)


def test_colorfulness_reward_is_differentiable_and_finite_on_a_flat_image():
    images = torch.full((2, 3, 4, 4), 0.5, requires_grad=True)
    reward = ColorfulnessReward()
    reward(images, ["a", "b"]).sum().backward()
    assert reward.differentiable and reward.name == "colorfulness"
    assert torch.isfinite(images.grad).all()
    vivid = torch.rand(2, 3, 4, 4, requires_grad=True)
    reward(vivid, ["a", "b"]).sum().backward()
    assert vivid.grad.abs().sum() > 0  # a gradient the decoder stage's reward term can follow
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(vivid, ["a"])


def test_build_reward_names_colorfulness():
    combined = build_reward({"toy_clip": 1.0, "colorfulness": 0.5})
    assert [term.reward.name for term in combined.terms] == ["toy_clip", "colorfulness"]
    assert isinstance(combined.terms[1].reward, ColorfulnessReward) and combined.terms[1].weight == 0.5
