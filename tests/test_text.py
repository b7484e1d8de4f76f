"""Text encoders: LlamaGen's left-padding convention, the toy encoder, T5 from a local directory."""

import pytest
import torch

from ranke.models.text import T5TextEncoder, left_pad
from ranke.runtime import UserError



def test_left_pad_by_hand():
    emb = torch.arange(1.0, 9.0).view(2, 4, 1)  # rows [1 2 3 4], [5 6 7 8]
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    out, out_mask = left_pad(emb, mask)
    assert out.flatten(1).tolist() == [[0, 0, 1, 2], [5, 6, 7, 8]]
    assert out_mask.tolist() == [[False, False, True, True], [True, True, True, True]]

WORDS = ["a", "red", "blue", "circle", "square", "left", "of", ","]


def tiny_t5_directory(path, d_model: int = 16):
    """A random 1-layer T5 encoder and a word-level tokenizer saved like a Hub checkpoint, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    T5EncoderModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    return tiny_t5_directory(tmp_path_factory.mktemp("t5"))


def test_t5_encoder_left_pads_the_encoder_output(tiny_t5):
    encoder = T5TextEncoder(tiny_t5, max_length=10)
    assert (encoder.dim, encoder.max_tokens) == (16, 10)
    emb, mask = encoder.encode(["A red circle", "a blue square left of a red circle"])
    assert emb.shape == (2, 10, 16)
    assert mask.sum(1).tolist() == [4, 9]  # words + </s>
    assert mask.tolist()[0] == [False] * 6 + [True] * 4
    assert torch.equal(emb[0, :6], torch.zeros(6, 16))
    ids = torch.tensor([[3, 4, 6, 1] + [0] * 6])  # "a red circle </s>", right-padded as T5 reads it
    direct = encoder.model(input_ids=ids, attention_mask=(ids > 0).long()).last_hidden_state
    assert torch.allclose(emb[0, 6:], direct[0, :4], atol=1e-6)


def test_t5_encoder_is_frozen_and_lowercases(tiny_t5):
    encoder = T5TextEncoder(tiny_t5, max_length=10)
    assert not any(p.requires_grad for p in encoder.model.parameters()) and not encoder.model.training
    upper, _ = encoder.encode(["  A RED Circle "])
    lower, _ = encoder.encode(["a red circle"])
    assert torch.equal(upper, lower) and not upper.requires_grad


def test_t5_encoder_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        T5TextEncoder(tmp_path / "nowhere")
