"""Toy CLIP: tokenizer, contrastive loss on hand numbers, hard negatives, the reward, training."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_logging import assert_tensorboard_matches_jsonl

from ranke.assets import save_asset
from ranke.rewards import Reward
from ranke.rewards.toy_clip import (
    ASSET_KIND,
    PAD,
    UNK,
    WORD_IDS,
    ToyCLIP,
    ToyCLIPArgs,
    ToyCLIPReward,
    hard_negative_caption,
    load_toy_clip,
    perturb_spec,
    tokenize,
)
from ranke.toy.captions import CaptionSpec, parse_caption
from ranke.toy.data import ToyConfig, render_caption
from ranke.toy.scenes import ObjectSpec, sample_scene
from ranke.train.judges import ToyCLIPConfig, contrastive_loss, train_toy_clip

TINY = ToyCLIPArgs(width=8, depth=0, text_width=32, embed_dim=32)
SWAPPED = (
    "a small red circle to the left of a large blue square",
    "a large blue square to the left of a small red circle",
)



pytestmark = pytest.mark.usefixtures("one_thread")

def _model(seed: int = 0) -> ToyCLIP:
    torch.manual_seed(seed)
    return ToyCLIP(TINY)


def _images(captions: list[str], seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    images = np.stack([render_caption(caption, rng) for caption in captions])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


# --- tokenizer and encoders -------------------------------------------------------------------


def test_tokenize_pads_to_the_longest_caption_and_truncates():
    ids = tokenize(["a large red circle", "one zebra."], max_words=3)
    expected = [
        [WORD_IDS["a"], WORD_IDS["large"], WORD_IDS["red"]],
        [WORD_IDS["one"], UNK, PAD],
    ]
    assert ids.tolist() == expected
    assert tokenize(["a, b"], max_words=8).tolist() == [[WORD_IDS["a"], WORD_IDS[","], UNK]]


def test_text_embedding_ignores_padding_and_reads_word_order():
    model = _model().eval()
    short = "a small red circle"
    long = "three objects: a small red circle, a large blue square and a small green diamond"
    with torch.no_grad():
        alone = model.encode_text(tokenize([short], 24))
        padded = model.encode_text(tokenize([short, long], 24))[:1]
        swapped = model.encode_text(tokenize(list(SWAPPED), 24))
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)
    # the two captions hold the same words: only their order tells them apart
    assert (swapped[0] - swapped[1]).abs().max() > 1e-3


def test_image_encoder_shapes():
    model = _model()
    assert model.encode_image(torch.zeros(2, 3, 64, 64)).shape == (2, TINY.embed_dim)
    assert model.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


# --- contrastive loss ---------------------------------------------------------------------------


def test_contrastive_loss_hand_numbers():
    s = 10.0
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)  # the third: an extra negative
    keys = torch.tensor([0, 1])
    loss = contrastive_loss(images, texts, torch.tensor(s), keys, torch.tensor([0, 1, 2]))
    # image 0 logits [s, 0, 0.6 s], image 1 logits [0, s, 0.8 s]; each caption sees [s, 0]
    image_to_text = (
        -math.log(math.exp(s) / (math.exp(s) + 1 + math.exp(0.6 * s)))
        - math.log(math.exp(s) / (1 + math.exp(s) + math.exp(0.8 * s)))
    ) / 2
    text_to_image = math.log(1 + math.exp(-s))
    assert loss.item() == pytest.approx((image_to_text + text_to_image) / 2, rel=1e-6)
    # without the extra text both directions are log(1 + e^-s)
    plain = contrastive_loss(images, texts[:2], torch.tensor(s), keys, keys)
    assert plain.item() == pytest.approx(math.log(1 + math.exp(-s)), rel=1e-6)


def test_contrastive_loss_does_not_push_apart_equal_captions():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    texts = images.clone()
    same = torch.tensor([3, 3])  # both pairs say the same thing: each other's caption is no negative
    assert contrastive_loss(images, texts, torch.tensor(5.0), same, same).item() == pytest.approx(0.0, abs=1e-7)
    # a hard negative equal to the OTHER image's caption is masked for that image only
    texts = torch.cat([texts, images[:1]])
    loss = contrastive_loss(images, texts, torch.tensor(5.0), torch.tensor([0, 1]), torch.tensor([0, 1, 0]))
    e5 = math.exp(5)
    expected_image_to_text = (-math.log(e5 / (e5 + 1)) - math.log(e5 / (e5 + 2))) / 2
    assert loss.item() == pytest.approx((expected_image_to_text + math.log(1 + math.exp(-5))) / 2, rel=1e-6)


def test_contrastive_loss_trains_the_temperature():
    images = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    scale = torch.tensor(3.0, requires_grad=True)
    contrastive_loss(images, images, scale, torch.arange(4), torch.arange(4)).backward()
    assert scale.grad < 0  # perfectly aligned pairs: a sharper softmax lowers the loss


# --- hard negatives -----------------------------------------------------------------------------


def test_perturbations_change_exactly_what_they_say():
    spec = parse_caption("a small red circle to the left of a large blue square")
    rng = np.random.default_rng(0)
    for _ in range(20):
        color = perturb_spec(spec, "color", rng)
        changed = [(a, b) for a, b in zip(spec.objects, color.objects) if a != b]
        assert len(changed) == 1 and changed[0][0].color != changed[0][1].color
        assert (changed[0][0].shape, changed[0][0].size) == (changed[0][1].shape, changed[0][1].size)
        relation = perturb_spec(spec, "relation", rng)
        assert relation.objects == spec.objects and relation.relation[1] in ("above", "below")
        assert perturb_spec(spec, "order", rng) == CaptionSpec(spec.objects, (0, "right of", 1))
        binding = perturb_spec(spec, "binding", rng)
        assert binding.objects in [
            (ObjectSpec("circle", "blue", "small"), ObjectSpec("square", "red", "large")),
            (ObjectSpec("square", "red", "small"), ObjectSpec("circle", "blue", "large")),
        ]
    single = parse_caption("a small red circle")
    assert all(perturb_spec(single, kind, rng) is None for kind in ("binding", "relation", "order"))
    with pytest.raises(ValueError, match="unknown hard negative kind"):
        perturb_spec(spec, "texture", rng)


def test_hard_negatives_never_describe_the_scene():
    rng = np.random.default_rng(1)
    for _ in range(300):
        spec = CaptionSpec.from_scene(sample_scene(rng))
        caption, negative = hard_negative_caption(spec, rng, phrasing=int(rng.integers(4)))
        assert parse_caption(caption).canonical() == negative.canonical() != spec.canonical()


# --- reward -------------------------------------------------------------------------------------


def test_reward_is_100_cosine_and_differentiable():
    model = _model()
    reward = ToyCLIPReward(model, name="toy_clip")
    assert isinstance(reward, Reward) and reward.differentiable
    prompts = ["a large red circle", SWAPPED[0]]
    images = _images(prompts).requires_grad_(True)
    scores = reward(images, prompts)
    with torch.no_grad():
        image_emb = F.normalize(model.encode_image(images * 2 - 1), dim=-1)
        text_emb = F.normalize(model.encode_text(tokenize(prompts, 24)), dim=-1)
    torch.testing.assert_close(scores.detach(), 100 * (image_emb * text_emb).sum(-1), rtol=1e-5, atol=1e-4)
    assert scores.abs().max() <= 100
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # one small step along the gradient raises the score: the gradient is the reward's own
    with torch.no_grad():
        stepped = reward(images + 1e-3 * images.grad / images.grad.norm(), prompts)
    assert (stepped.sum() > scores.sum()).item()
    assert all(not p.requires_grad for p in model.parameters())


def test_asset_round_trip(tmp_path):
    model = _model()
    save_asset(tmp_path / "clip.safetensors", ASSET_KIND, TINY, model.state_dict())
    loaded = load_toy_clip(tmp_path / "clip.safetensors", name="clip_score")
    assert loaded.name == "clip_score" and loaded.model.args == TINY
    prompts = ["a large red circle", SWAPPED[0]]
    images = _images(prompts)
    expected = ToyCLIPReward(model)(images, prompts)
    torch.testing.assert_close(loaded(images, prompts), expected, rtol=0, atol=0.5)  # fp16 weights


# --- training -----------------------------------------------------------------------------------


def test_training_learns_the_toy_world(tmp_path):
    cfg = ToyCLIPConfig(
        model=TINY, steps=100, batch_size=48, hard_negatives=1, lr=5e-3, warmup_steps=5, eval_prompts=100, eval_group=20
    )
    result = train_toy_clip(cfg, tmp_path, seed=0, toy=ToyConfig(supersample=2))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(10, 101, 10))
    assert_tensorboard_matches_jsonl(tmp_path)
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    # chance is 1/20 for retrieval and 1/2 for pairs (this run: 0.65 and 0.96)
    assert result["retrieval_top1"] > 0.4 and result["pair_accuracy"] > 0.9
    reward = load_toy_clip(result["asset"])
    prompts = ["a large red circle", "a small blue square"]
    images = _images(prompts, seed=5)
    assert (reward(images, prompts) > reward(images, prompts[::-1])).all()
