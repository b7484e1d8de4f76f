"""The policy transformer: official parameter layout, token layout, rotary, masks, train/eval hygiene."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ranke.models.gpt import GPT_PRESETS, GPTArgs, Transformer, apply_rotary, preset_args, rotary_table
from ranke.models.vq import VQ_PRESETS
from ranke.runtime import UserError

LAYOUTS = json.loads((Path(__file__).parent / "data" / "llamagen_layouts.json").read_text())

TINY = GPTArgs(dim=32, n_layer=2, n_head=4, cls_token_num=5, caption_dim=12, vocab_size=40, block_size=9)


def tiny_model(args: GPTArgs = TINY, seed: int = 0) -> Transformer:
    """A float64 model with every parameter random (LlamaGen zero-inits the output head)."""
    torch.manual_seed(seed)
    model = Transformer(args).double()
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.3)
    return model


def text_batch(args: GPTArgs, batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, args.cls_token_num, args.caption_dim, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.mark.parametrize("name", ["GPT-B", "GPT-L", "GPT-XL", "GPT-XXL"])
def test_preset_state_dict_equals_official_layout(name):
    with torch.device("meta"):
        model = Transformer(GPT_PRESETS[name])
    layout = [[key, list(tensor.shape)] for key, tensor in model.state_dict().items()]
    assert layout == LAYOUTS[name]


def test_ffn_hidden_dim_follows_llamagen_rounding():
    # int(2 * 4 * dim / 3) rounded up to 256: 2048 -> 2048, 2730 -> 2816, 3413 -> 3584
    assert [GPT_PRESETS[n].ffn_hidden_dim for n in ("GPT-B", "GPT-L", "GPT-XL")] == [2048, 2816, 3584]
    assert replace(TINY, dim=256, n_head=4, ffn_dim_multiplier=1.5).ffn_hidden_dim == 1024  # int(1.5*682)=1023


def test_preset_args():
    toy = preset_args("toy", vocab_size=512)
    assert (toy.vocab_size, toy.block_size, toy.cls_token_num) == (512, 64, 4)
    assert GPT_PRESETS["toy"].vocab_size == VQ_PRESETS["toy"].codebook_size
    # only the toy policy leaves text positions unrotated; official checkpoints need the zero rotation
    assert [name for name, args in GPT_PRESETS.items() if not args.zero_text_rotary] == ["toy"]
    with pytest.raises(UserError, match="GPT-XL"):
        preset_args("GPT-XLL")


def test_bad_shapes_are_user_errors():
    with pytest.raises(UserError, match="square"):
        replace(TINY, block_size=10)
    with pytest.raises(UserError, match="n_kv_head"):
        replace(TINY, n_kv_head=3)


def test_rotary_table_by_hand():
    args = GPTArgs(dim=16, n_layer=1, n_head=2, cls_token_num=3, caption_dim=4, vocab_size=5, block_size=4)
    table = rotary_table(args)  # head_dim 8: axis frequencies [1, 10000 ** -0.5]
    assert table.shape == (3 + 4, 4)
    assert torch.equal(table[:3], torch.zeros(3, 4, dtype=torch.complex128))  # text: cos = sin = 0
    freqs = [1.0, 0.01]
    for token, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        angles = torch.tensor([row * f for f in freqs] + [col * f for f in freqs], dtype=torch.float64)
        assert torch.allclose(table[3 + token].real, angles.cos())
        assert torch.allclose(table[3 + token].imag, angles.sin())
    unrotated = rotary_table(replace(args, zero_text_rotary=False))
    assert torch.equal(unrotated[:3], torch.ones(3, 4, dtype=torch.complex128))  # text: cos = 1, sin = 0
    assert torch.equal(unrotated[3:], table[3:])


def test_apply_rotary_rotates_pairs_and_zeroes_text():
    x = torch.tensor([1.0, 0.0, 0.0, 2.0], dtype=torch.float64).view(1, 1, 1, 4)
    theta = 0.3
    rotations = torch.tensor([[complex(math.cos(theta), math.sin(theta)), 1j]], dtype=torch.complex128)
    out = apply_rotary(x, rotations).flatten()
    # (1, 0) by theta -> (cos, sin); (0, 2) by 90 degrees -> (-2, 0)
    assert torch.allclose(out, torch.tensor([math.cos(theta), math.sin(theta), -2.0, 0.0], dtype=torch.float64))
    assert torch.equal(apply_rotary(x, torch.zeros(1, 2, dtype=torch.complex128)), torch.zeros_like(x))


def test_text_attention_is_uniform_like_llamagen():
    """Text queries and keys are zeroed, so (1) scaling the q/k projections cannot change what
    the last text position (which predicts image token 0) sees, and (2) the caption enters image
    positions of a 1-layer model as an order-free average."""
    args = replace(TINY, n_layer=1)
    model, text = tiny_model(args), text_batch(args, 2)
    tokens = torch.randint(0, args.vocab_size, (2, args.block_size), generator=torch.Generator().manual_seed(0))
    logits = model(text, tokens)
    with torch.no_grad():
        model.layers[0].attention.wqkv.weight[: 2 * args.dim] *= 5.0  # query and key rows
    assert torch.allclose(model(text, tokens)[:, 0], logits[:, 0], atol=1e-12)
    assert not torch.allclose(model(text, tokens)[:, 1:], logits[:, 1:])  # image positions do rotate
    shuffled = text[:, torch.randperm(args.cls_token_num, generator=torch.Generator().manual_seed(3))]
    assert torch.allclose(model(shuffled, tokens)[:, 1:], model(text, tokens)[:, 1:], atol=1e-12)


def test_unrotated_text_is_attended_by_content():
    """Without the zero rotation, text keys are real keys: what the last text position (which
    predicts image token 0) sees depends on the query/key projections. Text keys carry no
    position, so a 1-layer model still reads the caption as a set from image positions."""
    args = replace(TINY, n_layer=1, zero_text_rotary=False)
    model, text = tiny_model(args), text_batch(args, 2)
    tokens = torch.randint(0, args.vocab_size, (2, args.block_size), generator=torch.Generator().manual_seed(0))
    logits = model(text, tokens)
    shuffled = text[:, torch.randperm(args.cls_token_num, generator=torch.Generator().manual_seed(3))]
    assert torch.allclose(model(shuffled, tokens)[:, 1:], logits[:, 1:], atol=1e-12)
    with torch.no_grad():
        model.layers[0].attention.wqkv.weight[: 2 * args.dim] *= 5.0  # query and key rows
    assert not torch.allclose(model(text, tokens)[:, 0], logits[:, 0])


def test_token_layout_without_layers_by_hand():
    """With no blocks, token 0's logits are output(norm(cap_proj(text[T-1]))): position T-1 predicts it."""
    args = replace(TINY, n_layer=0)
    model, text = tiny_model(args), text_batch(args, 2)
    tokens = torch.randint(0, args.vocab_size, (2, 4))
    hidden = model.cls_embedding.cap_proj(text[:, -1])
    normed = hidden / hidden.pow(2).mean(-1, keepdim=True).add(args.norm_eps).sqrt() * model.norm.weight
    logits = model(text, tokens)
    assert logits.shape == (2, 4, args.vocab_size)
    assert torch.allclose(logits[:, 0].double(), normed @ model.output.weight.T)
    embedded = model.tok_embeddings.weight[tokens[:, 2]]  # token 3 is predicted from token 2's position
    normed = embedded / embedded.pow(2).mean(-1, keepdim=True).add(args.norm_eps).sqrt() * model.norm.weight
    assert torch.allclose(logits[:, 3].double(), normed @ model.output.weight.T)


def test_teacher_forcing_is_causal_and_matches_next_token_logits():
    model, text = tiny_model(), text_batch(TINY, 2)
    tokens = torch.randint(0, TINY.vocab_size, (2, TINY.block_size), generator=torch.Generator().manual_seed(0))
    logits = model(text, tokens)
    changed = tokens.clone()
    changed[:, 4] = (changed[:, 4] + 1) % TINY.vocab_size
    other = model(text, changed)
    assert torch.equal(other[:, :5], logits[:, :5])  # logits of tokens 0..4 do not see token 4
    assert not torch.allclose(other[:, 5:], logits[:, 5:])
    for t in (0, 4, TINY.block_size - 1):
        assert torch.allclose(model.next_token_logits(text, tokens[:, :t]), logits[:, t], atol=1e-12)


def test_text_mask_hides_padded_positions():
    model, text = tiny_model(), text_batch(TINY, 2)
    tokens = torch.randint(0, TINY.vocab_size, (2, TINY.block_size), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, TINY.cls_token_num, dtype=torch.bool)
    mask[0, :3] = False  # row 0: a 2-token caption, left-padded
    noisy = text.clone()
    noisy[0, :3] = 7.0
    assert torch.allclose(model(noisy, tokens, mask), model(text, tokens, mask), atol=1e-12)
    assert not torch.allclose(model(noisy, tokens), model(text, tokens))
    full = torch.ones_like(mask)
    assert torch.allclose(model(text, tokens, full), model(text, tokens), atol=1e-12)


def test_dropouts_only_when_asked():
    args = replace(TINY, token_dropout_p=0.2, resid_dropout_p=0.2, ffn_dropout_p=0.2, attn_dropout_p=0.2,
                   class_dropout_prob=0.5)
    model, text = tiny_model(args), text_batch(args, 64)
    tokens = torch.randint(0, args.vocab_size, (64, args.block_size))
    reference = model.eval()(text, tokens)
    model.train()
    assert torch.equal(model(text, tokens), reference)  # train mode alone changes nothing
    torch.manual_seed(0)
    assert not torch.allclose(model(text, tokens, dropout=True), reference)

    torch.manual_seed(0)
    dropped = model(text, tokens, caption_dropout=True)
    unconditional = model(model.cls_embedding.uncond_embedding.expand_as(text), tokens)
    is_dropped = torch.isclose(dropped, unconditional, atol=1e-12).flatten(1).all(1)
    is_kept = torch.isclose(dropped, reference, atol=1e-12).flatten(1).all(1)
    assert torch.all(is_dropped ^ is_kept)
    assert 16 < is_dropped.sum() < 48  # about half of 64 rows


def test_uncond_embedding_is_a_saved_untrained_buffer():
    model = Transformer(TINY)
    assert "cls_embedding.uncond_embedding" in model.state_dict()
    assert all("uncond" not in name for name, _ in model.named_parameters())
    assert torch.equal(model.output.weight, torch.zeros_like(model.output.weight))  # LlamaGen init
