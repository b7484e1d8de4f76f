import pytest
import torch

from ranke.runtime import UserError
from ranke.toy.text import ENCODING_VERSION, OBJECT_WIDTH, SUMMARY_WIDTH, ToyTextEncoder


def hot(emb_row):
    return torch.nonzero(emb_row).flatten().tolist()


def test_one_object_caption_by_hand():
    emb, mask = ToyTextEncoder(dim=56, max_tokens=5).encode(["a large red circle"])
    assert mask.tolist() == [[False, False, False, True, True]]
    assert torch.equal(emb[0, :3], torch.zeros(3, 56))  # left padding is zeros
    # summary: 1 object (index 0), no relation (index 3 + 4 = 7)
    assert hot(emb[0, 3]) == [0, 7]
    # object 0 block starts at 8: red = colour 0, circle = shape 0 (6 + 0), large = size 1 (6 + 4 + 1),
    # no role bit without a relation
    assert hot(emb[0, 4]) == [SUMMARY_WIDTH + 0, SUMMARY_WIDTH + 6, SUMMARY_WIDTH + 11]


def test_relation_and_object_slots_with_roles():
    emb, mask = ToyTextEncoder(dim=64, max_tokens=4).encode(["a small blue square to the left of a large yellow triangle"])
    assert mask.tolist() == [[False, True, True, True]]
    assert hot(emb[0, 1]) == [1, 3]  # 2 objects, relation "left of"
    # blue (4), square (6 + 1), small (10 + 0), role "left of" (12 + 0)
    assert hot(emb[0, 2]) == [SUMMARY_WIDTH + 4, SUMMARY_WIDTH + 7, SUMMARY_WIDTH + 10, SUMMARY_WIDTH + 12]
    second = SUMMARY_WIDTH + 16  # object 1's block
    # yellow (1), triangle (6 + 2), large (10 + 1), role "right of" (12 + 1): the converse
    assert hot(emb[0, 3]) == [second + 1, second + 8, second + 11, second + 13]
    below, _ = ToyTextEncoder(dim=64, max_tokens=4).encode(["a small blue square below a large yellow triangle"])
    assert hot(below[0, 2])[-1] == SUMMARY_WIDTH + 12 + 3 and hot(below[0, 3])[-1] == second + 12 + 2


def test_phrasings_of_one_request_encode_identically_and_order_matters():
    encoder = ToyTextEncoder(dim=64, max_tokens=4)
    assert torch.equal(encoder.encode(["a large red circle"])[0], encoder.encode(["one large red circle"])[0])
    a, _ = encoder.encode(["a large red circle, a small blue square and a large green triangle"])
    b, _ = encoder.encode(["three objects: a large red circle, a small blue square and a large green triangle"])
    c, _ = encoder.encode(["a small blue square, a large red circle and a large green triangle"])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # slots follow the caption's order
    # the converse phrasing of a relation: slots swapped, converse relation (left of 3, right of 4),
    # and each object keeps its role ("left of": role bit 12)
    left, _ = encoder.encode(["a large red circle to the left of a small blue square"])
    right, _ = encoder.encode(["a small blue square to the right of a large red circle"])
    assert hot(left[0, 1]) == [1, 3] and hot(right[0, 1]) == [1, 4]
    red_circle_on_the_left = [SUMMARY_WIDTH + 0, SUMMARY_WIDTH + 6, SUMMARY_WIDTH + 11, SUMMARY_WIDTH + 12]
    assert hot(left[0, 2]) == red_circle_on_the_left
    assert hot(right[0, 3]) == [i + OBJECT_WIDTH for i in red_circle_on_the_left]


def test_off_grammar_prompt_is_a_user_error():
    with pytest.raises(UserError, match="toy-grammar"):
        ToyTextEncoder(dim=64, max_tokens=4).encode(["a photo of a cat"])


def test_too_small_sizes_are_user_errors():
    with pytest.raises(UserError, match="text.dim"):
        ToyTextEncoder(dim=48, max_tokens=4)  # needs 8 + 3 x 16 = 56
    with pytest.raises(UserError, match="text.max_tokens"):
        ToyTextEncoder(dim=64, max_tokens=2)


def test_policy_asset_from_an_older_toy_encoding_fails_clearly(tmp_path):
    from ranke.assets import save_asset
    from ranke.backbones.base import build_text_encoder
    from ranke.backbones.toy import load_policy
    from ranke.config import TextConfig
    from ranke.models.gpt import Transformer, preset_args

    args = preset_args("toy", n_layer=1)
    state = Transformer(args).state_dict()
    current = TextConfig()
    save_asset(tmp_path / "new.safetensors", "policy", {"gpt": args, "text": current}, state)
    _, text = load_policy(tmp_path / "new.safetensors")
    assert text.toy_encoding == ENCODING_VERSION == 2
    assert build_text_encoder(text).encode(["a large red circle"])[0].shape == (1, 4, 64)

    # assets written before the encoding carried a version have no `toy_encoding`: version 1
    old_text = {"kind": "toy", "path": None, "max_tokens": 4, "dim": 64}
    save_asset(tmp_path / "old.safetensors", "policy", {"gpt": args, "text": old_text}, state)
    _, text = load_policy(tmp_path / "old.safetensors")
    with pytest.raises(UserError, match="toy text encoding v1.*retrain it with `ranke sft`"):
        build_text_encoder(text)
