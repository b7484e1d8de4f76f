"""The CFG sampler and teacher-forced scoring: KV cache vs full recompute, log-probs, filters."""

import dataclasses
import math
from dataclasses import replace

import pytest
import torch

from ranke.models.gpt import GPTArgs, Transformer
from ranke.runtime import UserError
from ranke.sampling import SamplingConfig, draw_tokens, filter_logits, generate, guided_logits, token_logprobs

ARGS = GPTArgs(dim=32, n_layer=2, n_head=4, cls_token_num=6, caption_dim=12, vocab_size=48, block_size=16)


def random_model(args: GPTArgs = ARGS, dtype=torch.float64, std: float = 0.15) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(args).to(dtype)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=std)
    return model


def captions(args: GPTArgs = ARGS, dtype=torch.float64, padded: bool = True):
    """Three left-padded captions of 6, 3 and 1 tokens (zeros before them), or no mask."""
    text = torch.randn(3, args.cls_token_num, args.caption_dim, generator=torch.Generator().manual_seed(1))
    if not padded:
        return text.to(dtype), None
    lengths = torch.tensor([6, 3, 1])
    mask = torch.arange(args.cls_token_num) >= args.cls_token_num - lengths[:, None]
    return (text * mask[..., None]).to(dtype), mask


def sample(model, text, mask, seed=7, **kwargs):
    """`generate` with the SamplingConfig fields among `kwargs` as its settings (scale 1 unless
    given, no top-k), the rest as its keywords."""
    fields = {f.name for f in dataclasses.fields(SamplingConfig)}
    sampling = SamplingConfig(**({"cfg_scale": 1.0, "top_k": 0} | {k: v for k, v in kwargs.items() if k in fields}))
    options = {"generator": torch.Generator().manual_seed(seed), "return_logprobs": True}
    return generate(model, text, mask, sampling, **(options | {k: v for k, v in kwargs.items() if k not in fields}))


def test_guided_logits_by_hand():
    out = guided_logits(torch.tensor([3.0, 0.0]), torch.tensor([1.0, 1.0]), cfg_scale=4.0)
    assert torch.equal(out, torch.tensor([9.0, -3.0]))  # 1 + 4 * (3 - 1), 1 + 4 * (0 - 1)


def test_filter_logits_by_hand():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0]])
    inf = float("-inf")
    assert torch.equal(filter_logits(logits, top_k=2), torch.tensor([[inf, inf, 3.0, 2.0]]))
    assert torch.equal(filter_logits(logits, top_k=0), logits)
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    kept = lambda top_p: torch.isfinite(filter_logits(probs, top_p=top_p))[0].tolist()
    assert kept(0.4) == [False, True, False, False]  # 0.5 alone reaches 0.4
    assert kept(0.7) == [False, True, False, True]  # 0.5 + 0.3
    assert kept(0.85) == [True, True, False, True]  # 0.5 + 0.3 + 0.15
    assert kept(1.0) == [True, True, True, True]
    both = filter_logits(probs, top_k=3, top_p=0.7)  # top-3 renormalised: 0.5/0.95 alone < 0.7
    assert torch.isfinite(both)[0].tolist() == [False, True, False, True]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
@pytest.mark.parametrize("settings", [{}, {"top_k": 5}, {"top_p": 0.8}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9}])
def test_kv_cache_equals_full_recompute(padded, cfg_scale, settings):
    model = random_model()
    text, mask = captions(padded=padded)
    cached = sample(model, text, mask, cfg_scale=cfg_scale, **settings)
    recomputed = sample(model, text, mask, cfg_scale=cfg_scale, use_kv_cache=False, **settings)
    assert torch.equal(cached.tokens, recomputed.tokens)
    assert torch.allclose(cached.logprobs, recomputed.logprobs, atol=1e-10)
    assert len(set(cached.tokens.flatten().tolist())) > 5  # a real sample, not a constant sequence


def test_kv_cache_with_grouped_kv_heads():
    model = random_model(replace(ARGS, n_kv_head=2))
    text, mask = captions()
    cached = sample(model, text, mask, cfg_scale=3.0, top_k=10)
    assert torch.equal(cached.tokens, sample(model, text, mask, cfg_scale=3.0, top_k=10, use_kv_cache=False).tokens)


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_sampler_logprobs_are_conditional_teacher_forced_logprobs(cfg_scale):
    model = random_model(dtype=torch.float32, std=0.3)
    text, mask = captions(dtype=torch.float32)
    out = sample(model, text, mask, cfg_scale=cfg_scale)
    scored = token_logprobs(model, text, mask, out.tokens)
    assert (scored - out.logprobs).abs().max() < 1e-5
    assert out.logprobs.min() < math.log(1 / ARGS.vocab_size)  # not a degenerate near-uniform policy


def test_sampler_logprobs_ignore_temperature_and_filters():
    model = random_model(std=0.3)
    text, mask = captions()
    out = sample(model, text, mask, cfg_scale=5.0, temperature=0.5, top_k=3, top_p=0.9)
    assert torch.allclose(token_logprobs(model, text, mask, out.tokens), out.logprobs, atol=1e-10)


def test_top_k_1_is_greedy_guided_decoding():
    model = random_model()
    text, mask = captions()
    out = sample(model, text, mask, cfg_scale=3.0, top_k=1)
    uncond = model.cls_embedding.uncond_embedding.expand_as(text)
    for t in range(ARGS.block_size):
        prefix = out.tokens[:, :t]
        cond = model.next_token_logits(text, prefix, mask)
        guided = guided_logits(cond, model.next_token_logits(uncond, prefix, mask), 3.0)
        assert torch.equal(out.tokens[:, t], guided.argmax(-1))


def test_generator_alone_decides_the_draws():
    model = random_model()
    text, mask = captions()
    first, again = sample(model, text, mask, seed=3), sample(model, text, mask, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.tokens, sample(model, text, mask, seed=4).tokens)
    assert first.tokens.shape == (3, ARGS.block_size) and first.tokens.dtype == torch.long


def test_sampling_leaves_the_model_untouched():
    model = random_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sample(model, *captions(), cfg_scale=4.0)
    after = model.state_dict()
    assert after.keys() == before.keys()  # no cache buffers
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_token_logprobs_uniform_policy_by_hand_and_differentiable():
    model = Transformer(ARGS)  # LlamaGen init: zero output head, every token has probability 1/V
    text, mask = captions(dtype=torch.float32)
    tokens = sample(model, text, mask, cfg_scale=4.0).tokens
    logprobs, entropy = token_logprobs(model, text, mask, tokens, return_entropy=True)
    assert torch.allclose(logprobs, torch.full_like(logprobs, -math.log(ARGS.vocab_size)))
    assert torch.allclose(entropy, torch.full_like(entropy, math.log(ARGS.vocab_size)))
    logprobs.sum().backward()  # sampled tokens are ordinary tensors usable under autograd
    assert model.output.weight.grad.abs().sum() > 0


def test_token_logprobs_never_apply_dropout():
    args = replace(ARGS, token_dropout_p=0.3, resid_dropout_p=0.3, ffn_dropout_p=0.3, class_dropout_prob=0.5)
    model = random_model(args)
    text, mask = captions(args)
    tokens = sample(model, text, mask).tokens
    expected = token_logprobs(model.eval(), text, mask, tokens)
    assert torch.equal(token_logprobs(model.train(), text, mask, tokens), expected)


@pytest.mark.parametrize("bad", [{"temperature": 0.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_settings_are_user_errors(bad):
    with pytest.raises(UserError):
        sample(random_model(), *captions(), **bad)


def test_draw_tokens_inverse_cdf_by_hand_and_never_a_filtered_token():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75]] * 4)
    uniforms = torch.tensor([0.0, 0.2499, 0.25, 0.9999])
    assert draw_tokens(probs, uniforms).tolist() == [1, 1, 3, 3]
    many = draw_tokens(probs[:1].expand(20000, 4), torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    assert set(many.tolist()) == {1, 3} and abs((many == 3).float().mean().item() - 0.75) < 0.01



def test_draw_tokens_k_per_row_are_the_rows_drawn_one_by_one():
    """[B, k] uniforms draw k tokens per row (the pixel rollout's G predictions per position), each
    the token its uniform draws alone."""
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.0, 0.5]])
    uniforms = torch.tensor([[0.05, 0.5, 0.99], [0.2, 0.6, 0.4]])
    drawn = draw_tokens(probs, uniforms)
    assert drawn.tolist() == [[0, 2, 3], [0, 3, 0]]
    for column in range(3):
        assert torch.equal(drawn[:, column], draw_tokens(probs, uniforms[:, column]))

def test_a_slice_of_the_global_batch_samples_what_the_whole_batch_does():
    """Data-parallel ranks holding rows [0, 2) and [2, 3) draw the tokens of one 3-row call."""
    model = random_model()
    text, mask = captions()
    whole = sample(model, text, mask, cfg_scale=3.0, top_k=10)
    first = sample(model, text[:2], mask[:2], cfg_scale=3.0, top_k=10, total_rows=3)
    last = sample(model, text[2:], mask[2:], cfg_scale=3.0, top_k=10, row_offset=2, total_rows=3)
    assert torch.equal(torch.cat([first.tokens, last.tokens]), whole.tokens)
    torch.testing.assert_close(torch.cat([first.logprobs, last.logprobs]), whole.logprobs)
    with pytest.raises(ValueError, match="not inside"):
        sample(model, text, mask, row_offset=1, total_rows=3)
