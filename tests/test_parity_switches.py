"""Text and sampling switches against values computed the upstream way (LlamaGen, the RankE release).

The expected cleaned captions were produced by LlamaGen's own `T5Embedder.text_preprocessing`
(language/t5.py) on these inputs; the padding and cfg_interval references below follow the
steps of LlamaGen's sampler and `generate` loop.
"""

from __future__ import annotations

import sys

import pytest
import torch

from ranke.models.caption_cleaning import clean_caption
from ranke.models.text import T5TextEncoder
from ranke.runtime import UserError
from ranke.sampling import SamplingConfig, generate, guided_position, uses_guidance

from test_sampling import captions, random_model
from test_janus import janus_dir  # noqa: F401 (fixture)
from test_text import tiny_t5  # noqa: F401 (fixture)

UPSTREAM_CLEANED = {
    "A Red Circle &amp; a blue square — free shipping!! http://shop.example.com/item?id=123":
        "a red circle a blue square - !! ?id=123",
    "<b>Beautiful</b> sunset over the sea @photog123 #12 IMG_20190101.jpg": "beautiful sunset over the sea",
    "“Vintage” poster, 1920x1080, page 3 … click for details": '"vintage" poster, , …',
    "this-is-my-cute-cat_on-the_sofa": "this is my cute cat on the sofa",
    "Caf\u00c3\u00a9 interior, jc6640 lamp   :  modern  ": "cafã interior, lamp: modern",
    "'a dog running on grass'": "a dog running on grass",
    "Bild: 東京 tower at night, 192.168.0.1 www.site.org/x": "bild: tower at night",
    "Download free: 50% OFF...Canvas+Print": "50% off canvas print",
}  # fmt: skip


@pytest.mark.parametrize("caption", list(UPSTREAM_CLEANED))
def test_caption_cleaning_equals_llamagen(caption):
    pytest.importorskip("ftfy")
    pytest.importorskip("bs4")
    assert clean_caption(caption) == UPSTREAM_CLEANED[caption]


def test_caption_cleaning_without_its_extra_names_the_install(monkeypatch, tiny_t5):
    monkeypatch.setitem(sys.modules, "ftfy", None)
    with pytest.raises(UserError, match=r"pip install 'ranke\[captions\]', or set text.clean_captions=false"):
        T5TextEncoder(tiny_t5, max_length=10, clean_captions=True)


def test_t5_cleaning_switch_encodes_the_cleaned_caption(tiny_t5):
    pytest.importorskip("ftfy")
    pytest.importorskip("bs4")
    cleaned = T5TextEncoder(tiny_t5, max_length=10, clean_captions=True)
    plain = T5TextEncoder(tiny_t5, max_length=10)
    web = "A <b>Red</b>  circle @someone"
    assert cleaned.preprocess(web) == "a red circle"
    assert torch.equal(cleaned.encode([web])[0], plain.encode(["a red circle"])[0])
    assert not torch.equal(plain.encode([web])[0], plain.encode(["a red circle"])[0])


def test_t5_padding_sides_as_llamagen_samples_and_the_release_post_trains(tiny_t5):
    prompts = ["a red circle", "a blue square left of a red circle"]
    left = T5TextEncoder(tiny_t5, max_length=10, padding="left")
    right = T5TextEncoder(tiny_t5, max_length=10, padding="right")
    tokens = left.tokenizer(prompts, max_length=10, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        raw = left.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    # the release: T5's output and mask as they come (valid tokens first)
    emb, mask = right.encode(prompts)
    assert torch.equal(emb, raw) and torch.equal(mask, tokens.attention_mask.bool())
    # LlamaGen's sampler: each row rotated by its valid count, the flipped mask multiplied in
    flipped = tokens.attention_mask.flip(-1)
    expected = torch.stack([torch.cat([row[int(n):], row[: int(n)]]) for row, n in zip(raw, tokens.attention_mask.sum(1))])
    emb, mask = left.encode(prompts)
    torch.testing.assert_close(emb, expected * flipped[..., None], rtol=0, atol=0)
    assert torch.equal(mask, flipped.bool())
    with pytest.raises(UserError, match="text.padding"):
        T5TextEncoder(tiny_t5, padding="middle")


def test_t5_dtype_switch(tiny_t5):
    emb, _ = T5TextEncoder(tiny_t5, max_length=10, dtype=torch.bfloat16).encode(["a red circle"])
    reference, _ = T5TextEncoder(tiny_t5, max_length=10).encode(["a red circle"])
    assert emb.dtype == torch.float32 and torch.equal(emb, emb.bfloat16().float())  # bf16 values
    assert not torch.equal(emb, reference)
    torch.testing.assert_close(emb, reference, rtol=0.05, atol=0.05)


def upstream_greedy(model, text, mask, cfg_scale: float, cfg_interval: int) -> torch.Tensor:
    """LlamaGen's generate with top-k 1: the first token from the prefill (guided when s > 1),
    then a decode loop whose guidance flag turns off for good once its counter i > cfg_interval."""
    batch, guided_rows = text.shape[0], cfg_scale > 1.0
    rows = torch.cat([text, model.cls_embedding.uncond_embedding.expand_as(text)]) if guided_rows else text
    rows_mask = torch.cat([mask, mask]) if guided_rows else mask

    def step(tokens, flag):
        logits = model.next_token_logits(rows, torch.cat([tokens, tokens]) if guided_rows else tokens, rows_mask)
        if guided_rows:
            cond, uncond = logits[:batch], logits[batch:]
            logits = uncond + (cond - uncond) * cfg_scale if flag else cond
        return logits.argmax(-1, keepdim=True)

    tokens = step(torch.empty(batch, 0, dtype=torch.long), True)
    flag = True
    for i in range(model.args.block_size - 1):
        if cfg_interval > -1 and i > cfg_interval:
            flag = False
        tokens = torch.cat([tokens, step(tokens, flag)], dim=1)
    return tokens


def _greedy(model, text, mask, **settings):
    sampling = SamplingConfig(**({"top_k": 1} | settings))
    return generate(model, text, mask, sampling, generator=torch.Generator().manual_seed(0)).tokens


def test_cfg_interval_tokens_equal_llamagen():
    model = random_model(std=0.4).eval()
    text, mask = captions()
    with torch.no_grad():
        for interval in (-1, 0, 3):
            ours = _greedy(model, text, mask, cfg_scale=6.0, cfg_interval=interval)
            assert torch.equal(ours, upstream_greedy(model, text, mask, 6.0, interval)), interval
    always = _greedy(model, text, mask, cfg_scale=6.0)
    never = _greedy(model, text, mask, cfg_scale=1.0)
    partial = _greedy(model, text, mask, cfg_scale=6.0, cfg_interval=3)
    assert torch.equal(partial[:, :5], always[:, :5]) and not torch.equal(partial, always)
    assert not torch.equal(partial, never)
    assert [guided_position(t, 3) for t in range(7)] == [True] * 5 + [False] * 2


def test_scale_below_one_follows_llamagen_unless_mix_is_asked_for():
    model = random_model(std=0.4).eval()
    text, mask = captions()
    with torch.no_grad():
        conditional = _greedy(model, text, mask, cfg_scale=0.5)
        assert torch.equal(conditional, _greedy(model, text, mask, cfg_scale=1.0))
        assert torch.equal(conditional, upstream_greedy(model, text, mask, 0.5, -1))
        mixed = _greedy(model, text, mask, cfg_scale=0.5, cfg_below_one="mix")
    assert not torch.equal(mixed, conditional)
    assert (uses_guidance(0.5), uses_guidance(0.5, "mix"), uses_guidance(1.0, "mix")) == (False, True, False)
    with pytest.raises(UserError, match="cfg_below_one"):
        uses_guidance(2.0, "always")


def test_janus_sampler_takes_the_same_guidance_switches(janus_dir):
    from ranke.config import SamplingConfig
    from ranke.backbones.janus import load_janus_backbone

    backbone = load_janus_backbone(janus_dir)[0]
    ids, mask = backbone.encode_prompts(["a red circle left of a big blue square", "green circle"])

    def greedy(**settings):
        sampling = SamplingConfig(**({"cfg_scale": 5.0, "top_k": 1} | settings))
        return backbone.sample(ids, mask, sampling, torch.Generator().manual_seed(0)).tokens

    always, partial = greedy(), greedy(cfg_interval=0)
    assert torch.equal(partial[:, :2], always[:, :2]) and not torch.equal(partial, always)
    assert torch.equal(greedy(cfg_scale=0.5), greedy(cfg_scale=1.0))
    assert not torch.equal(greedy(cfg_scale=0.5, cfg_below_one="mix"), greedy(cfg_scale=1.0))
