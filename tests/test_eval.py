"""`ranke.eval.evaluate`: the Evaluator's metrics against the judges applied by hand, its
reproducibility, and policy / decoder overrides."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ranke.assets import asset_path
from ranke.backbones import load_toy_backbone
from ranke.config import RunConfig
from ranke.eval.evaluate import Evaluator, kid_subsets, metrics_table, quantize
from ranke.eval.fid import frechet_distance_from_features, kernel_distance
from ranke.eval.manifold import manifold_metrics
from ranke.eval.shift import code_histogram, token_entropy_bits, token_kl
from ranke.sample_folder import batch_seed
from ranke.models.vq import to_model_range
from ranke.rewards.colorfulness import colorfulness
from ranke.rewards.toy_clip import load_toy_clip
from ranke.rewards.toy_features import load_toy_features
from ranke.runtime import UserError
from ranke.toy.captions import CaptionSpec, parse_caption
from ranke.toy.data import heldout_scenes, scene_for_caption, split_scenes_and_prompts
from ranke.toy.render import render_scenes
from ranke.toy.verifier import score_image, summarize

N = 12


@pytest.fixture(scope="module")
def backbone_and_evaluator(one_thread):
    backbone, cfg = load_toy_backbone()
    return backbone, Evaluator(cfg, "cpu", n=N, seed=4, batch_size=5)


@pytest.fixture(scope="module")
def metrics(backbone_and_evaluator):
    backbone, evaluator = backbone_and_evaluator
    return evaluator(backbone, preview=N), evaluator.preview.clone()


def test_quantize_rounds_to_8_bit_levels():
    values = torch.tensor([-0.5, 0.0, 0.2, 0.61, 1.0, 1.2])
    expected = torch.tensor([0.0, 0.0, 51.0, 156.0, 255.0, 255.0]) / 255.0  # 0.61 * 255 = 155.55 -> 156
    assert torch.equal(quantize(values), expected)


def test_metrics_are_the_judges_applied_to_the_samples(backbone_and_evaluator, metrics):
    _, evaluator = backbone_and_evaluator
    result, images = metrics
    prompts = evaluator.prompts
    assert result["n"] == N and len(images) == N
    assert torch.equal(images, quantize(images))  # scored as 8-bit images
    reward = load_toy_clip(asset_path("reward_clip"))(images, prompts).mean().item()
    clip_score = load_toy_clip(asset_path("eval_clip"))(images, prompts).mean().item()
    assert result["reward"] == pytest.approx(reward, rel=1e-5)
    assert result["clip_score"] == pytest.approx(clip_score, rel=1e-5)
    assert result["reward"] != pytest.approx(result["clip_score"], rel=1e-3)  # two different judges
    assert result["colorfulness"] == pytest.approx(colorfulness(images).mean().item(), rel=1e-6)
    features = load_toy_features(asset_path("features"))(images)
    assert result["fd"] == pytest.approx(frechet_distance_from_features(features, evaluator.real_features), rel=1e-6)
    kid = kernel_distance(features, evaluator.real_features, num_subsets=1, paired=True)  # N = 12: one subset
    for key, value in manifold_metrics(evaluator.real_features, features, nearest_k=5).items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    assert kid_subsets(N) == 1 and result["kid"] == pytest.approx(kid[0], rel=1e-6)
    per_image = [score_image(image.permute(1, 2, 0).numpy(), prompt) for image, prompt in zip(images, prompts)]
    assert result["preview_correct"] == [bool(verdict.correct) for verdict in per_image]
    verdicts = summarize(per_image)
    assert result["verifier_accuracy"] == verdicts["accuracy"]
    assert result["verifier_by_num_objects"] == verdicts["by_num_objects"]
    assert result["token_entropy_real"] == pytest.approx(token_entropy_bits(evaluator.real_histogram))


def test_real_side_is_the_heldout_scenes_of_the_prompts(backbone_and_evaluator):
    """FD and token KL compare against the renders of the scenes the prompts were written for."""
    backbone, evaluator = backbone_and_evaluator
    cfg = RunConfig()
    scenes = heldout_scenes(cfg.toy)[:N]
    assert [CaptionSpec.from_scene(s).canonical() for s in scenes] == [parse_caption(p).canonical() for p in evaluator.prompts]
    real = torch.from_numpy(render_scenes(scenes, cfg.toy.image_size, cfg.toy.supersample)).permute(0, 3, 1, 2)
    np.testing.assert_allclose(evaluator.real_features, load_toy_features(asset_path("features"))(real), rtol=1e-6)
    with torch.no_grad():
        codes = backbone.tokenizer.encode_codes(to_model_range(real.float() / 255.0)).flatten(1)
    assert torch.equal(evaluator.real_codes, codes)
    assert evaluator.real_histogram.sum() == N * codes.shape[1]


def test_real_reference_scores_another_real_image_of_each_prompt(backbone_and_evaluator, metrics):
    """The noise floor: a second real set (another scene per caption, seeded) scored like samples."""
    _, evaluator = backbone_and_evaluator
    cfg = RunConfig()
    rng = np.random.default_rng(1)
    scenes = [scene_for_caption(prompt, rng) for prompt in evaluator.prompts]
    second = torch.from_numpy(render_scenes(scenes, cfg.toy.image_size, cfg.toy.supersample)).permute(0, 3, 1, 2)
    features = load_toy_features(asset_path("features"))(second)
    reference = evaluator.real_reference(seed=1)
    assert reference["n"] == N
    assert reference["fd"] == pytest.approx(frechet_distance_from_features(features, evaluator.real_features), rel=1e-6)
    reward = load_toy_clip(asset_path("reward_clip"))(second.float() / 255.0, evaluator.prompts).mean().item()
    assert reference["reward"] == pytest.approx(reward, rel=1e-5)
    assert reference["colorfulness"] == pytest.approx(colorfulness(second.float() / 255.0).mean().item(), rel=1e-6)
    assert reference["verifier_accuracy"] >= 0.75  # real images of the captions: the verifier mostly agrees
    assert reference["precision"] == pytest.approx(manifold_metrics(evaluator.real_features, features)["precision"])
    with torch.no_grad():  # the second set's codes through the evaluator's own (here the base) decoder
        codes = evaluator.tokenizer.encode_codes(to_model_range(second.float() / 255.0)).flatten(1)
        decoded = quantize(backbone_and_evaluator[0].decode(codes).float())
        back = evaluator.tokenizer.encode_codes(to_model_range(decoded)).flatten(1)
    assert reference["roundtrip_agreement"] == pytest.approx((back == codes).double().mean().item())
    # the first real images' codes through the same (base) decoder, as a call with that decoder has it
    assert reference["roundtrip_agreement_real"] == pytest.approx(metrics[0]["roundtrip_agreement_real"])
    assert reference["fd"] != evaluator.real_reference(seed=2)["fd"]


def _sampled_tokens(backbone, evaluator) -> torch.Tensor:
    codes = []
    for batch, begin in enumerate(range(0, N, 5)):  # batch k draws from its own seed
        generator = torch.Generator().manual_seed(batch_seed(4, batch))
        emb, mask = backbone.encode_prompts(evaluator.prompts[begin : begin + 5])
        codes.append(backbone.sample(emb, mask, evaluator.sampling, generator).tokens)
    return torch.cat(codes)


def test_token_kl_of_the_policy_tokens(backbone_and_evaluator, metrics):
    backbone, evaluator = backbone_and_evaluator
    result, _ = metrics
    histogram = code_histogram(_sampled_tokens(backbone, evaluator), evaluator.codebook_size)
    assert result["token_kl"] == pytest.approx(token_kl(histogram, evaluator.real_histogram))
    assert result["token_entropy"] == pytest.approx(token_entropy_bits(histogram))
    assert result["token_kl"] > 0


def test_roundtrip_agreement_of_the_samples_and_of_the_real_codes(backbone_and_evaluator, metrics):
    """The share of tokens the base encoder gives back: from the 8-bit samples, and from the real
    images' ground-truth codes decoded by the same decoder."""
    backbone, evaluator = backbone_and_evaluator
    result, images = metrics
    tokens = _sampled_tokens(backbone, evaluator)
    with torch.no_grad():
        back = backbone.tokenizer.encode_codes(to_model_range(images)).flatten(1)
        real_decoded = quantize(backbone.decode(evaluator.real_codes).float())
        real_back = backbone.tokenizer.encode_codes(to_model_range(real_decoded)).flatten(1)
    assert result["roundtrip_agreement"] == pytest.approx((back == tokens).double().mean().item())
    assert result["roundtrip_agreement_real"] == pytest.approx((real_back == evaluator.real_codes).double().mean().item())
    assert 0 < result["roundtrip_agreement"] < 1 and 0 < result["roundtrip_agreement_real"] < 1


def test_calls_are_reproducible_and_overrides_act(backbone_and_evaluator, metrics):
    backbone, evaluator = backbone_and_evaluator
    result, _ = metrics
    same = evaluator(backbone, policy=backbone.policy, decoder=backbone.tokenizer)
    assert {k: v for k, v in same.items() if k != "seconds"} == {k: v for k, v in result.items() if k != "seconds"}

    other_decoder = copy.deepcopy(backbone.tokenizer)
    with torch.no_grad():
        other_decoder.decoder.conv_out.weight.mul_(0.2)  # washed-out images, same tokens
    changed = evaluator(backbone, decoder=other_decoder)
    for key in ("token_kl", "token_entropy", "token_kl_per_position"):
        assert changed[key] == result[key]
    assert changed["fd"] != pytest.approx(result["fd"], rel=1e-3)
    # fewer tokens come back from washed-out images, of the samples and of the real codes alike
    assert changed["roundtrip_agreement"] < result["roundtrip_agreement"] - 0.1
    assert changed["roundtrip_agreement_real"] < result["roundtrip_agreement_real"] - 0.1

    other_policy = copy.deepcopy(backbone.policy)
    with torch.no_grad():
        other_policy.output.weight.mul_(0.0)  # uniform next-token distribution
    uniform = evaluator(backbone, policy=other_policy)
    assert uniform["token_entropy"] > result["token_entropy"]
    assert backbone.policy.output.weight.abs().sum() > 0  # the backbone's own policy is untouched


def test_bad_sizes_are_user_errors():
    _, cfg = load_toy_backbone()
    with pytest.raises(UserError, match="--n must be between 6 and the 2000"):
        Evaluator(cfg, "cpu", n=5000)
    with pytest.raises(UserError, match="--n must be between 6 and .* got 5"):  # the 5 nearest neighbours of each
        Evaluator(cfg, "cpu", n=5)
    with pytest.raises(UserError, match="--batch-size"):
        Evaluator(cfg, "cpu", n=6, batch_size=0)


def test_metrics_table_is_one_row():
    metrics = {"n": 1000, "reward": 55.13, "clip_score": 54.471, "fd": 71.489, "precision": 0.61234, "recall": 0.5,
               "density": 1.0456, "coverage": 0.7771, "verifier_accuracy": 0.043, "token_kl": 0.03747,
               "token_entropy": 9.704, "roundtrip_agreement": 0.70149}  # fmt: skip
    lines = metrics_table(metrics, "sft").splitlines()
    assert lines[0] == ("| model | n | reward | clip_score | fd | precision | recall | density | coverage | verifier_accuracy "
                        "| token_kl | token_entropy | roundtrip_agreement |")  # fmt: skip
    assert lines[1] == "|---" * 13 + "|"
    assert lines[2] == "| sft | 1000 | 55.13 | 54.47 | 71.49 | 0.612 | 0.500 | 1.046 | 0.777 | 0.043 | 0.0375 | 9.70 | 0.701 |"


def test_validation_split_is_its_own_fixed_set():
    """Settings are chosen on the validation prompts: fixed, and none of them a held-out scene."""
    cfg = RunConfig().toy
    scenes, prompts = split_scenes_and_prompts("validation", cfg)
    again_scenes, again_prompts = split_scenes_and_prompts("validation", cfg)
    assert prompts == again_prompts and len(prompts) == cfg.validation_size
    assert [CaptionSpec.from_scene(s).canonical() for s in scenes] == [parse_caption(p).canonical() for p in prompts]
    heldout = split_scenes_and_prompts("heldout", cfg)
    assert heldout[0] == heldout_scenes(cfg)
    assert not set(map(repr, scenes)) & set(map(repr, heldout[0]))
    with pytest.raises(ValueError, match="unknown split 'test'"):
        split_scenes_and_prompts("test", cfg)
    with pytest.raises(UserError, match="unknown split"):
        Evaluator(RunConfig(), "cpu", n=4, split="test")


def test_validation_evaluator_scores_the_validation_prompts(one_thread):
    evaluator = Evaluator(RunConfig(), "cpu", n=6, split="validation")
    assert evaluator.prompts == split_scenes_and_prompts("validation", RunConfig().toy)[1][:6]


def test_reconstruction_is_psnr_and_fd_of_decoded_ground_truth_codes(backbone_and_evaluator):
    backbone, evaluator = backbone_and_evaluator
    result = evaluator.reconstruction(backbone.tokenizer)
    with torch.no_grad():
        images = quantize(backbone.decode(evaluator.real_codes).float())
    real = evaluator.real_images.float() / 255.0
    mse = (images - real).pow(2).flatten(1).mean(dim=1)
    assert result["recon_psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-6)
    features = load_toy_features(asset_path("features"))(images)
    assert result["recon_fd"] == pytest.approx(frechet_distance_from_features(features, evaluator.real_features), rel=1e-6)
    # a decoder that renders every code as mid grey is far worse on both
    grey = copy.deepcopy(backbone.tokenizer)
    torch.nn.init.zeros_(grey.decoder.conv_out.weight)
    torch.nn.init.zeros_(grey.decoder.conv_out.bias)
    worse = evaluator.reconstruction(grey)
    assert worse["recon_psnr"] < result["recon_psnr"] - 3 and worse["recon_fd"] > result["recon_fd"]
