"""The Janus-Pro adapter on a tiny random transformers Janus model saved with save_pretrained."""

import copy
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusProcessor,
    JanusVisionConfig,
    JanusVQVAEConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from ranke.backbones.janus import JanusBackbone, load_janus_backbone
from ranke.config import SamplingConfig
from ranke.runtime import UserError
from ranke.sampling import sample_next_tokens

WORDS = ["<unk>", "<bos>", "<eos>", "<pad>", "<image>", "<boi>", "<eoi>", "User", "Assistant", ":"]
WORDS += ["a", "red", "blue", "green", "circle", "square", "left", "of", "big"]
ID = {word: index for index, word in enumerate(WORDS)}
TEMPLATE = (
    "{% for message in messages %}User : {{ message['content'][0]['text'] }} {% endfor %}"
    "{% if add_generation_prompt %}Assistant :{% endif %}"
)
HIDDEN = 32
GRID = 4  # 4x4 image tokens, decoded to 32x32 px (the perceptual loss needs >= 28 px)
PIXELS = 32
CODES = 64
PROMPTS = ["a red circle left of a big blue square", "green circle", "a blue square"]


def tiny_processor() -> JanusProcessor:
    """A word-level tokenizer that adds BOS, with Janus' special tokens, and a one-turn chat template."""
    tokenizer = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", ID["<bos>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>", "boi_token": "<boi>", "eoi_token": "<eoi>"},
    )
    image_processor = JanusImageProcessorPil(size={"height": 32, "width": 32})
    return JanusProcessor(image_processor, fast, chat_template=TEMPLATE, num_image_tokens=GRID * GRID)


def tiny_config() -> JanusConfig:
    """Janus-Pro's structure at toy width: Llama LM, SigLIP tower, VQ-16-style tokenizer."""
    text = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
        bos_token_id=ID["<bos>"], eos_token_id=ID["<eos>"], pad_token_id=ID["<pad>"],
    )
    vision = JanusVisionConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=32 // GRID,
        projection_dim=HIDDEN, num_image_tokens=GRID * GRID, mlp_ratio=2.0,
    )
    vq = JanusVQVAEConfig(
        embed_dim=8, num_embeddings=CODES, latent_channels=32, base_channels=32, channel_multiplier=[1, 1, 1, 1],
        num_res_blocks=1, projection_dim=HIDDEN, image_token_embed_dim=HIDDEN, initializer_range=0.2,
    )
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=ID["<image>"])


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory, one_thread):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("janus")
    JanusForConditionalGeneration(tiny_config()).save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return path


@pytest.fixture
def backbone(janus_dir) -> JanusBackbone:
    return load_janus_backbone(janus_dir)[0]


def sampling(**overrides) -> SamplingConfig:
    return SamplingConfig(**({"cfg_scale": 5.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0} | overrides))


def draw(backbone, prompts=PROMPTS, seed=0, **overrides):
    ids, mask = backbone.encode_prompts(prompts)
    generator = torch.Generator().manual_seed(seed)
    return ids, mask, backbone.sample(ids, mask, sampling(**overrides), generator, return_logprobs=True)


def test_prompts_are_chat_formatted_left_padded_and_end_with_image_start(backbone):
    ids, mask = backbone.encode_prompts(["green circle", "a red circle"])
    words = ["<bos>", "User", ":", "green", "circle", "Assistant", ":", "<boi>"]
    assert ids[0].tolist() == [ID["<pad>"]] + [ID[word] for word in words]
    assert mask[0].tolist() == [0] + [1] * len(words)
    assert ids[1, -1] == ID["<boi>"] and mask[1].all()


def test_unconditional_rows_keep_only_bos_and_image_start(backbone):
    ids, _ = backbone.encode_prompts(["green circle", "a red circle"])
    uncond = backbone.text_encoder.unconditional(ids)
    pad, bos, boi = ID["<pad>"], ID["<bos>"], ID["<boi>"]
    assert uncond.tolist() == [[pad, bos] + [pad] * 6 + [boi], [bos] + [pad] * 7 + [boi]]


def test_sample_shapes_and_seeded_reproducibility(backbone):
    _, _, first = draw(backbone, seed=3, top_k=20, temperature=0.9)
    _, _, again = draw(backbone, seed=3, top_k=20, temperature=0.9)
    _, _, other = draw(backbone, seed=4, top_k=20, temperature=0.9)
    assert first.tokens.shape == first.logprobs.shape == (len(PROMPTS), GRID * GRID)
    assert first.tokens.dtype == torch.long and 0 <= first.tokens.min() and first.tokens.max() < CODES
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.logprobs, again.logprobs)
    assert not torch.equal(first.tokens, other.tokens)
    assert torch.isfinite(first.logprobs).all() and (first.logprobs < 0).all()


def test_sampler_logprobs_equal_teacher_forced_logprobs(backbone):
    ids, mask, sample = draw(backbone, seed=1, cfg_scale=5.0, temperature=0.8, top_k=30, top_p=0.95)
    scored, entropy = backbone.token_logprobs(backbone.policy, ids, mask, sample.tokens, return_entropy=True)
    torch.testing.assert_close(scored, sample.logprobs, atol=1e-5, rtol=1e-5)
    assert scored.requires_grad and entropy.shape == scored.shape
    assert ((entropy > 0) & (entropy <= torch.log(torch.tensor(float(CODES))) + 1e-5)).all()


def test_left_padding_does_not_change_logprobs(backbone):
    _, _, sample = draw(backbone, seed=4)
    ids, mask = backbone.encode_prompts(PROMPTS)
    alone_ids, alone_mask = backbone.encode_prompts(PROMPTS[1:2])
    assert alone_ids.shape[1] < ids.shape[1]
    batched = backbone.token_logprobs(backbone.policy, ids, mask, sample.tokens)[1]
    alone = backbone.token_logprobs(backbone.policy, alone_ids, alone_mask, sample.tokens[1:2])[0]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_cfg_scale_one_is_ancestral_sampling_from_the_conditional_policy(backbone):
    """Replaying the same generator on the teacher-forced conditional distribution redraws the same tokens."""
    ids, mask, sample = draw(backbone, seed=2, cfg_scale=1.0, temperature=0.7)
    logits = backbone.token_logits(backbone.policy, ids, mask, sample.tokens)
    assert logits.shape == (len(PROMPTS), GRID * GRID, CODES)
    replay = torch.Generator().manual_seed(2)
    for t in range(GRID * GRID):
        redrawn = sample_next_tokens(logits[:, t] / 0.7, replay)
        assert torch.equal(redrawn, sample.tokens[:, t])


def test_guidance_changes_the_draws(backbone):
    _, _, plain = draw(backbone, seed=5, cfg_scale=1.0, top_k=1)
    _, _, guided = draw(backbone, seed=5, cfg_scale=5.0, top_k=1)
    assert not torch.equal(plain.tokens, guided.tokens)


def test_greedy_cfg_tokens_equal_transformers_janus_generate(backbone, janus_dir):
    """Same unconditional rows, positions, cache and guidance as transformers' image generation."""
    prompts = ["a red circle", "a blue square"]  # same length: transformers' positions ignore padding
    ids, mask = backbone.encode_prompts(prompts)
    ours = backbone.sample(ids, mask, sampling(cfg_scale=3.0, top_k=1), torch.Generator().manual_seed(0)).tokens
    model = JanusForConditionalGeneration.from_pretrained(janus_dir)
    model.generation_config.generation_kwargs = {"boi_token_id": ID["<boi>"]}
    reference = model.generate(
        input_ids=ids, attention_mask=mask, generation_mode="image", do_sample=False, guidance_scale=3.0
    )
    assert torch.equal(ours, reference)


def test_decode_matches_the_janus_vq_in_unit_range_with_decoder_gradient(backbone, janus_dir):
    tokens = torch.randint(CODES, (2, GRID * GRID), generator=torch.Generator().manual_seed(0))
    images = backbone.decode(tokens)
    assert images.shape == (2, 3, PIXELS, PIXELS) and images.min() >= 0 and images.max() <= 1
    reference = JanusForConditionalGeneration.from_pretrained(janus_dir).model.vqmodel.decode(tokens)
    ours = backbone.tokenizer.decode_codes(tokens.view(2, GRID, GRID))
    torch.testing.assert_close(ours, reference.detach(), atol=1e-4, rtol=1e-4)

    backbone.tokenizer.decode_codes(tokens).square().mean().backward()
    decoder = backbone.tokenizer
    assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.decoder_parameters())
    assert decoder.last_layer is decoder.vq.decoder.conv_out.weight
    assert all(not p.requires_grad and p.grad is None for p in decoder.vq.encoder.parameters())
    assert not decoder.vq.quantize.embedding.weight.requires_grad


def test_encode_codes_takes_the_nearest_unit_code(backbone):
    """With a unit-norm codebook, transformers' raw-codebook search agrees with our cosine lookup."""
    vq = backbone.tokenizer.vq
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(backbone.tokenizer.codebook_vectors())
    images = torch.rand(2, 3, PIXELS, PIXELS, generator=torch.Generator().manual_seed(0)) * 2 - 1
    codes = backbone.tokenizer.encode_codes(images)
    assert codes.shape == (2, GRID, GRID) and codes.dtype == torch.long
    assert torch.equal(codes.flatten(), vq.encode(images).image_tokens)


def test_decoder_step_moves_decoder_but_not_codebook_or_encoder(backbone):
    decoder = backbone.tokenizer
    trainable_prefixes = ("decoder.", "post_quant_conv.")
    frozen = {
        name: p.detach().clone() for name, p in decoder.vq.named_parameters() if not name.startswith(trainable_prefixes)
    }
    trained = [p.detach().clone() for p in decoder.decoder_parameters()]
    images = torch.rand(2, 3, PIXELS, PIXELS, generator=torch.Generator().manual_seed(1)) * 2 - 1
    codes = decoder.encode_codes(images)
    optimizer = torch.optim.AdamW(decoder.decoder_parameters(), lr=1e-3)
    (decoder.decode_codes(codes) - images).abs().mean().backward()
    optimizer.step()
    assert all(not torch.equal(before, p) for before, p in zip(trained, decoder.decoder_parameters()))
    assert all(torch.equal(frozen[name], p) for name, p in decoder.vq.named_parameters() if name in frozen)
    assert "quantize.embedding.weight" in frozen and "encoder.conv_in.weight" in frozen
    assert torch.equal(decoder.encode_codes(images), codes)


def test_policy_update_changes_logprobs_and_state_dict_round_trips(backbone, janus_dir):
    policy = backbone.policy
    assert {name.split(".")[0] for name in policy.state_dict()} == {
        "language_model", "generation_embeddings", "generation_aligner", "generation_head",
    }
    ids, mask, sample = draw(backbone, seed=6)
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    (-backbone.token_logprobs(policy, ids, mask, sample.tokens).mean()).backward()
    assert policy.generation_embeddings.weight.grad.abs().sum() > 0
    optimizer.step()

    updated = backbone.token_logprobs(policy, ids, mask, sample.tokens).detach()
    assert updated.mean() > sample.logprobs.mean()
    before = backbone.token_logprobs(reference, ids, mask, sample.tokens)
    torch.testing.assert_close(before, sample.logprobs, atol=1e-5, rtol=1e-5)

    fresh = load_janus_backbone(janus_dir)[0]
    fresh.policy.load_state_dict(policy.state_dict())
    torch.testing.assert_close(fresh.token_logprobs(fresh.policy, ids, mask, sample.tokens), updated, atol=0, rtol=0)


def test_gradient_checkpointing_recomputes_and_keeps_the_gradients(backbone):
    """Policy: transformers' per-layer checkpointing (each layer runs again in backward);
    decoder: one recomputed segment. Gradients equal the plain backward's."""
    ids, mask, sample = draw(backbone, seed=2)
    images = torch.rand(2, 3, PIXELS, PIXELS, generator=torch.Generator().manual_seed(3)) * 2 - 1
    codes = backbone.tokenizer.encode_codes(images)
    layer_calls = []
    backbone.policy.language_model.layers[0].self_attn.register_forward_pre_hook(lambda *_: layer_calls.append(1))

    def gradients() -> dict[str, torch.Tensor]:
        for module in (backbone.policy, backbone.tokenizer):
            module.zero_grad(set_to_none=True)
        (-backbone.token_logprobs(backbone.policy, ids, mask, sample.tokens).mean()).backward()
        (backbone.tokenizer.decode_codes(codes) - images).abs().mean().backward()
        named = [*backbone.policy.named_parameters(), *backbone.tokenizer.named_parameters()]
        return {name: p.grad.clone() for name, p in named if p.grad is not None}

    plain = gradients()
    assert len(layer_calls) == 1
    backbone.policy.enable_gradient_checkpointing()
    backbone.tokenizer.enable_gradient_checkpointing()
    recomputed = gradients()
    assert len(layer_calls) == 3  # forward, then again in backward
    assert plain.keys() == recomputed.keys() and any(name.startswith("vq.decoder.") for name in plain)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_load_refuses_missing_or_non_janus_directories(tmp_path):
    with pytest.raises(UserError, match="no Janus model"):
        load_janus_backbone(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="'llama' model, not a transformers Janus model"):
        load_janus_backbone(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "janus",')  # a torn download
    with pytest.raises(UserError, match=r"Janus config '.*config.json' is not valid JSON \(line 1: "):
        load_janus_backbone(tmp_path)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(UserError, match="'None' model, not a transformers Janus model"):
        load_janus_backbone(tmp_path)


@pytest.mark.parametrize("mode", ["both", "pixel_and_decoder"])  # RankE; VA-π's rollout with the decoder stage
def test_cli_sample_and_one_ranke_step_on_janus(janus_dir, tmp_path, capsys, mode):
    from safetensors.torch import load_file

    from ranke.checkpoint import latest_checkpoint
    from ranke.cli import main
    from ranke.toy.tools import write_samples

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ngreen circle\n")
    main(["sample", "--backbone", "janus", "--model-path", str(janus_dir), "--prompts", str(prompts),
          "--out", str(tmp_path / "samples")])  # fmt: skip
    assert '"n": 2' in capsys.readouterr().out

    write_samples(4, tmp_path / "data", split="train", seed=1)
    run = tmp_path / "run"
    main(["posttrain", "--backbone", "janus", "--model-path", str(janus_dir), "--out", str(run),
          f"data={tmp_path / 'data'}", f"mode={mode}", "steps=1", "prompts_per_step=2", "group_size=2", "disc_start=0",
          "eval_samples=0", "grid_prompts=2", "policy_lr=1e-3", "decoder_lr=1e-3"])  # fmt: skip
    start = load_janus_backbone(janus_dir)[0]
    checkpoint = latest_checkpoint(run)
    policy, decoder = load_file(checkpoint / "policy.safetensors"), load_file(checkpoint / "vq.safetensors")
    changed = lambda tensors, module: [k for k, v in module.state_dict().items() if not torch.equal(v, tensors[k])]  # noqa: E731
    assert any(k.startswith("language_model.") for k in changed(policy, start.policy))
    moved = changed(decoder, start.tokenizer)
    assert moved and all(not k.startswith(("vq.encoder.", "vq.quantize.", "vq.quant_conv.")) for k in moved), moved
