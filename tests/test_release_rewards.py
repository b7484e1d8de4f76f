"""The release's other rewards (LAION aesthetic, ImageReward), per-reward switches, four-reward configs.

Tiny random-weight models are saved in the real files' layouts: the aesthetic predictor's bare
state dict (layers.0/2/4/6/7) and ImageReward.pt's original BLIP names, written out here from the
original code's module structure, independently of the renaming under test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ranke.rewards import CombinedReward
from ranke.rewards.aesthetic import AestheticHead, AestheticReward, load_aesthetic_head
from ranke.rewards.base import normalize_pixels, resize_center_crop
from ranke.rewards.build import RewardFiles, RewardSettings, build_reward
from ranke.rewards.clip import CLIPReward
from ranke.rewards.combine import RewardTerm
from ranke.rewards.hpsv2 import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ranke.rewards.image_reward import SCORE_MEAN, SCORE_STD, ImageRewardScorer
from ranke.runtime import UserError

from test_rewards import BrightnessReward, ListReward, _FakeOpenCLIP, _images, fake_open_clip, tiny_clip_dir  # noqa: F401


def _random_mlp_state(input_size: int, seed: int) -> dict[str, torch.Tensor]:
    """The linearMSE predictor's file: Linear layers at Sequential indices 0, 2, 4, 6, 7."""
    generator = torch.Generator().manual_seed(seed)
    widths = [input_size, 1024, 128, 64, 16, 1]
    state = {}
    for index, (w_in, w_out) in zip((0, 2, 4, 6, 7), zip(widths[:-1], widths[1:])):
        state[f"layers.{index}.weight"] = torch.randn(w_out, w_in, generator=generator) / math.sqrt(w_in)
        state[f"layers.{index}.bias"] = torch.randn(w_out, generator=generator) * 0.1
    return state


def _mlp_by_hand(state: dict[str, torch.Tensor], x: torch.Tensor, prefix: str = "") -> torch.Tensor:
    for index in (0, 2, 4, 6, 7):  # no activations between the layers
        x = x @ state[f"{prefix}layers.{index}.weight"].T + state[f"{prefix}layers.{index}.bias"]
    return x[:, 0]


# --- aesthetic ---------------------------------------------------------------------------------


def test_aesthetic_scores_the_mlp_of_unit_clip_image_embeddings(tiny_clip_dir, tmp_path):
    clip = CLIPReward(tiny_clip_dir)
    state = _random_mlp_state(clip.model.config.projection_dim, seed=1)
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    reward = AestheticReward(clip, load_aesthetic_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", 8))
    images = _images(3, 16).requires_grad_(True)
    scores = reward(images, ["a", "b", "c"])

    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        pixels = (F.interpolate(images, size=(8, 8), mode="bicubic", antialias=True) - mean) / std
        features = clip.model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)
        expected = _mlp_by_hand(state, F.normalize(features, dim=-1))
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    scores.sum().backward()  # the gradient test the other rewards pass
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert reward(images.detach(), ["x", "y", "z"]).equal(scores.detach())  # prompts are not read


def test_aesthetic_rejects_other_layouts_and_missing_files(tiny_clip_dir, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_aesthetic_head(tmp_path / "none.pth", 8)
    # the release's own MLP class (ReLUs, Linear layers at 0, 3, 6, 9, 12) does not fit the file
    relu_layout = {f"layers.{i}.weight": torch.zeros(2, 2) for i in (0, 3, 6, 9, 12)}
    torch.save(relu_layout, tmp_path / "relu.pth")
    with pytest.raises(UserError, match="layers.0/2/4/6/7"):
        load_aesthetic_head(tmp_path / "relu.pth", 8)
    with pytest.raises(UserError, match="ViT-L/14"):
        AestheticReward(CLIPReward(tiny_clip_dir), AestheticHead(768))


# --- ImageReward -------------------------------------------------------------------------------

VISION = dict(width=32, depth=2, heads=16, patch=4, image=8)  # the released head counts, 2-d heads
TEXT = dict(width=24, depth=2, heads=12, vocab=40, positions=40)
WORDS = ["a", "red", "circle", "blue", "square", "on", "the", "left", "of", "two"]


def _original_image_reward_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """ImageReward.pt's names and shapes: timm-style ViT `blip.visual_encoder`, BERT with
    cross-attention `blip.text_encoder`, BLIP's unused projections, the score MLP."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    def norm(prefix, width):
        return {f"{prefix}.weight": 1 + rand(width, scale=0.1), f"{prefix}.bias": rand(width, scale=0.1)}

    def linear(prefix, w_out, w_in):
        return {f"{prefix}.weight": rand(w_out, w_in, scale=1 / math.sqrt(w_in)), f"{prefix}.bias": rand(w_out, scale=0.1)}

    d, p = VISION["width"], VISION["patch"]
    patches = (VISION["image"] // p) ** 2
    v = "blip.visual_encoder"
    state = {f"{v}.cls_token": rand(1, 1, d), f"{v}.pos_embed": rand(1, patches + 1, d),
             f"{v}.patch_embed.proj.weight": rand(d, 3, p, p), f"{v}.patch_embed.proj.bias": rand(d), **norm(f"{v}.norm", d)}
    for i in range(VISION["depth"]):
        b = f"{v}.blocks.{i}"
        state |= {**norm(f"{b}.norm1", d), **norm(f"{b}.norm2", d), **linear(f"{b}.attn.qkv", 3 * d, d),
                  **linear(f"{b}.attn.proj", d, d), **linear(f"{b}.mlp.fc1", 4 * d, d), **linear(f"{b}.mlp.fc2", d, 4 * d)}
    h, t = TEXT["width"], "blip.text_encoder"
    state |= {f"{t}.embeddings.word_embeddings.weight": rand(TEXT["vocab"], h),
              f"{t}.embeddings.position_embeddings.weight": rand(TEXT["positions"], h),
              f"{t}.embeddings.position_ids": torch.arange(TEXT["positions"])[None], **norm(f"{t}.embeddings.LayerNorm", h)}
    for i in range(TEXT["depth"]):
        b = f"{t}.encoder.layer.{i}"
        for attention, source in (("attention", h), ("crossattention", d)):
            state |= {**linear(f"{b}.{attention}.self.query", h, h), **linear(f"{b}.{attention}.self.key", h, source),
                      **linear(f"{b}.{attention}.self.value", h, source), **linear(f"{b}.{attention}.output.dense", h, h),
                      **norm(f"{b}.{attention}.output.LayerNorm", h)}
        state |= {**linear(f"{b}.intermediate.dense", 4 * h, h), **linear(f"{b}.output.dense", h, 4 * h),
                  **norm(f"{b}.output.LayerNorm", h)}
    state |= {**linear("blip.vision_proj", 6, d), **linear("blip.text_proj", 6, h)}
    return state | {f"mlp.{k}": v for k, v in _random_mlp_state(h, seed + 1).items()}


def _attention(s, prefix, x, source, heads, mask=None):
    """BERT attention block by hand: softmax(q k^T / sqrt(d)) v, output dense, residual, LayerNorm."""
    def heads_of(y):
        return y.view(y.shape[0], y.shape[1], heads, -1).transpose(1, 2)

    q = heads_of(x @ s[f"{prefix}.self.query.weight"].T + s[f"{prefix}.self.query.bias"])
    k = heads_of(source @ s[f"{prefix}.self.key.weight"].T + s[f"{prefix}.self.key.bias"])
    val = heads_of(source @ s[f"{prefix}.self.value.weight"].T + s[f"{prefix}.self.value.bias"])
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    context = (logits.softmax(-1) @ val).transpose(1, 2).reshape(x.shape)
    out = context @ s[f"{prefix}.output.dense.weight"].T + s[f"{prefix}.output.dense.bias"]
    return F.layer_norm(out + x, (x.shape[-1],), s[f"{prefix}.output.LayerNorm.weight"], s[f"{prefix}.output.LayerNorm.bias"], 1e-12)


def _image_reward_by_hand(s, pixels, input_ids, attention_mask):
    """ImageReward's forward written from the original BLIP modules (pre-norm ViT, post-norm BERT)."""
    v, d, heads = "blip.visual_encoder", VISION["width"], VISION["heads"]
    x = F.conv2d(pixels, s[f"{v}.patch_embed.proj.weight"], s[f"{v}.patch_embed.proj.bias"], stride=VISION["patch"])
    x = torch.cat([s[f"{v}.cls_token"].expand(x.shape[0], 1, d), x.flatten(2).transpose(1, 2)], 1) + s[f"{v}.pos_embed"]
    for i in range(VISION["depth"]):
        b = f"{v}.blocks.{i}"
        y = F.layer_norm(x, (d,), s[f"{b}.norm1.weight"], s[f"{b}.norm1.bias"], 1e-6)
        qkv = (y @ s[f"{b}.attn.qkv.weight"].T + s[f"{b}.attn.qkv.bias"]).view(*y.shape[:2], 3, heads, -1)
        q, k, val = qkv.permute(2, 0, 3, 1, 4)
        y = ((q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ val).transpose(1, 2).reshape(x.shape)
        x = x + y @ s[f"{b}.attn.proj.weight"].T + s[f"{b}.attn.proj.bias"]
        y = F.layer_norm(x, (d,), s[f"{b}.norm2.weight"], s[f"{b}.norm2.bias"], 1e-6)
        y = F.gelu(y @ s[f"{b}.mlp.fc1.weight"].T + s[f"{b}.mlp.fc1.bias"])
        x = x + y @ s[f"{b}.mlp.fc2.weight"].T + s[f"{b}.mlp.fc2.bias"]
    image_tokens = F.layer_norm(x, (d,), s[f"{v}.norm.weight"], s[f"{v}.norm.bias"], 1e-6)

    t, h = "blip.text_encoder", TEXT["width"]
    x = s[f"{t}.embeddings.word_embeddings.weight"][input_ids] + s[f"{t}.embeddings.position_embeddings.weight"][: input_ids.shape[1]]
    x = F.layer_norm(x, (h,), s[f"{t}.embeddings.LayerNorm.weight"], s[f"{t}.embeddings.LayerNorm.bias"], 1e-12)
    for i in range(TEXT["depth"]):
        b = f"{t}.encoder.layer.{i}"
        x = _attention(s, f"{b}.attention", x, x, TEXT["heads"], attention_mask.bool())
        x = _attention(s, f"{b}.crossattention", x, image_tokens, TEXT["heads"])
        y = F.gelu(x @ s[f"{b}.intermediate.dense.weight"].T + s[f"{b}.intermediate.dense.bias"])
        y = y @ s[f"{b}.output.dense.weight"].T + s[f"{b}.output.dense.bias"]
        x = F.layer_norm(y + x, (h,), s[f"{b}.output.LayerNorm.weight"], s[f"{b}.output.LayerNorm.bias"], 1e-12)
    return (_mlp_by_hand(s, x[:, 0], prefix="mlp.") - SCORE_MEAN) / SCORE_STD


@pytest.fixture(scope="module")
def tiny_image_reward(tmp_path_factory):
    """(checkpoint, tokenizer directory, original state) of a random ImageReward in the real layout."""
    from transformers import BertTokenizer

    directory = tmp_path_factory.mktemp("image_reward")
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory / "bert")
    state = _original_image_reward_state()
    torch.save(state, directory / "ImageReward.pt")
    return directory / "ImageReward.pt", directory / "bert", state


def test_image_reward_equals_the_original_blip_forward(tiny_image_reward):
    checkpoint, tokenizer_dir, state = tiny_image_reward
    reward = ImageRewardScorer(checkpoint, tokenizer_dir)
    images = _images(2, 12).requires_grad_(True)  # 12 px: resized to the model's 8
    prompts = ["a red circle on the left of two blue squares", "a square"]
    scores = reward(images, prompts)

    tokens = reward.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens.input_ids.shape == (2, 35) and tokens.input_ids[0, 0] == 2  # [CLS] first, padded to 35
    with torch.no_grad():
        pixels = normalize_pixels(resize_center_crop(images, 8), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        expected = _image_reward_by_hand(state, pixels, tokens.input_ids, tokens.attention_mask)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_image_reward_errors_name_the_missing_piece(tiny_image_reward, tmp_path):
    checkpoint, tokenizer_dir, state = tiny_image_reward
    with pytest.raises(UserError, match="tokenizer directory"):
        ImageRewardScorer(checkpoint, tmp_path)
    with pytest.raises(UserError, match="ImageReward checkpoint .* not found"):
        ImageRewardScorer(tmp_path / "ImageReward.pt", tokenizer_dir)
    broken = {k: v for k, v in state.items() if "blocks.1.mlp.fc2.bias" not in k}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(UserError, match="missing: vision.encoder.layers.1.mlp.fc2.bias"):
        ImageRewardScorer(tmp_path / "broken.pt", tokenizer_dir)


# --- switches and the release's combination ----------------------------------------------------


def test_reward_term_scale_normalisation_and_gradient_switches():
    images = _images().requires_grad_(True)
    combined = CombinedReward(
        [
            RewardTerm(BrightnessReward(), 2.0, scale=100.0, normalize=False, gradient=False),
            RewardTerm(ListReward("b", [[1.0, 3.0, 5.0]]), 0.5),  # normalised by default
        ]
    )
    out = combined(images, ["p"] * 3)
    brightness = images.detach().mean(dim=(1, 2, 3))
    expected = 2.0 * 100.0 * brightness + 0.5 * torch.tensor([-2.0, 0.0, 2.0]) / (math.sqrt(8 / 3) + 1e-6)
    torch.testing.assert_close(out.total, expected)
    torch.testing.assert_close(out.components["brightness"], 100.0 * brightness)
    assert not out.total.requires_grad  # the only differentiable reward is switched to no gradient
    assert combined.differentiable_score(images, ["p"] * 3) is None and not combined.differentiable
    assert "brightness" not in combined.stats or combined.stats["brightness"].count == 0


def test_four_reward_release_combination_from_a_config(tiny_clip_dir, tiny_image_reward, fake_open_clip, tmp_path):
    """clip + aesthetic + image_reward + hpsv2 as the release combines them: raw weighted sum,
    hpsv2 x100 without gradient; built from the posttrain config keys of a YAML preset."""
    from ranke import config as config_lib
    from ranke.config import RunConfig
    from ranke.rewards.build import build_posttrain_reward

    torch.manual_seed(0)
    torch.save({"state_dict": _FakeOpenCLIP().state_dict()}, tmp_path / "hps.pt")
    torch.save(_random_mlp_state(8, seed=3), tmp_path / "aesthetic.pth")
    checkpoint, tokenizer_dir, _ = tiny_image_reward
    preset = tmp_path / "four.yaml"
    preset.write_text(json.dumps({"posttrain": {
        "rewards": {"clip": 1.0, "aesthetic": 0.5, "image_reward": 2.0, "hpsv2": 0.25},
        "clip_path": str(tiny_clip_dir), "aesthetic_path": str(tmp_path / "aesthetic.pth"),
        "image_reward_path": str(checkpoint), "image_reward_tokenizer": str(tokenizer_dir),
        "hpsv2_path": str(tmp_path / "hps.pt"),
        "reward_scale": {"hpsv2": 100.0}, "reward_gradient": {"hpsv2": False},
        "reward_normalize": {"clip": False, "aesthetic": False, "image_reward": False, "hpsv2": False},
    }}))  # fmt: skip
    reward = build_posttrain_reward(config_lib.load(RunConfig, str(preset)).posttrain)
    images, prompts = _images(2, 8).requires_grad_(True), ["a red circle", "a blue square"]
    out = reward(images, prompts)
    parts = {term.name: term.reward(images, prompts) for term in reward.terms}
    expected = parts["clip"] + 0.5 * parts["aesthetic"] + 2.0 * parts["image_reward"] + 0.25 * 100.0 * parts["hpsv2"]
    torch.testing.assert_close(out.total, expected)
    assert {t.name for t in reward.terms if t.differentiable} == {"clip", "aesthetic", "image_reward"}
    rewards = {term.name: term.reward for term in reward.terms}
    assert rewards["aesthetic"].clip is rewards["clip"]  # one CLIP serves clip and aesthetic
    differentiable = reward.differentiable_score(images, prompts)
    torch.testing.assert_close(differentiable, parts["clip"] + 0.5 * parts["aesthetic"] + 2.0 * parts["image_reward"])


def test_reward_settings_name_only_configured_rewards():
    with pytest.raises(UserError, match="reward_scale names 'hpsv2'"):
        build_reward({"toy_clip": 1.0}, settings=RewardSettings(scale={"hpsv2": 100.0}))
    with pytest.raises(UserError, match="reward_gradient.toy_clip must be true or false"):
        build_reward({"toy_clip": 1.0}, settings=RewardSettings(gradient={"toy_clip": 1}))
    with pytest.raises(UserError, match="aesthetic_path"):
        build_reward({"aesthetic": 1.0}, files=RewardFiles(clip_path="x"))
