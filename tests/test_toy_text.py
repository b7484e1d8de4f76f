import pytest
import torch

from ranke.runtime import UserError
from ranke.toy.text import OBJECT_WIDTH, SUMMARY_WIDTH, ToyTextEncoder


def hot(emb_row):
    return torch.nonzero(emb_row).flatten().tolist()


def test_one_object_caption_by_hand():
    emb, mask = ToyTextEncoder(dim=48, max_tokens=5).encode(["a large red circle"])
    assert mask.tolist() == [[False, False, False, True, True]]
    assert torch.equal(emb[0, :3], torch.zeros(3, 48))  # left padding is zeros
    # summary: 1 object (index 0), no relation (index 3 + 4 = 7)
    assert hot(emb[0, 3]) == [0, 7]
    # object 0 block starts at 8: red = colour 0, circle = shape 0 (6 + 0), large = size 1 (6 + 4 + 1)
    assert hot(emb[0, 4]) == [SUMMARY_WIDTH + 0, SUMMARY_WIDTH + 6, SUMMARY_WIDTH + 11]


def test_relation_and_object_slots():
    emb, mask = ToyTextEncoder(dim=48, max_tokens=4).encode(["a small blue square to the left of a large yellow triangle"])
    assert mask.tolist() == [[False, True, True, True]]
    assert hot(emb[0, 1]) == [1, 3]  # 2 objects, relation "left of"
    second = SUMMARY_WIDTH + 12  # object 1's block
    assert hot(emb[0, 3]) == [second + 1, second + 6 + 2, second + 10 + 1]  # yellow, triangle, large


def test_phrasings_of_one_request_encode_identically_and_order_matters():
    encoder = ToyTextEncoder(dim=64, max_tokens=4)
    assert torch.equal(encoder.encode(["a large red circle"])[0], encoder.encode(["one large red circle"])[0])
    a, _ = encoder.encode(["a large red circle, a small blue square and a large green triangle"])
    b, _ = encoder.encode(["three objects: a large red circle, a small blue square and a large green triangle"])
    c, _ = encoder.encode(["a small blue square, a large red circle and a large green triangle"])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # slots follow the caption's order
    # the converse phrasing of a relation: slots swapped, converse relation (left of 3, right of 4)
    left, _ = encoder.encode(["a large red circle to the left of a small blue square"])
    right, _ = encoder.encode(["a small blue square to the right of a large red circle"])
    assert hot(left[0, 1]) == [1, 3] and hot(right[0, 1]) == [1, 4]
    red_circle = [SUMMARY_WIDTH + 0, SUMMARY_WIDTH + 6, SUMMARY_WIDTH + 11]
    assert hot(left[0, 2]) == red_circle and hot(right[0, 3]) == [i + OBJECT_WIDTH for i in red_circle]


def test_off_grammar_prompt_is_a_user_error():
    with pytest.raises(UserError, match="toy-grammar"):
        ToyTextEncoder(dim=64, max_tokens=4).encode(["a photo of a cat"])


def test_too_small_sizes_are_user_errors():
    with pytest.raises(UserError, match="text.dim"):
        ToyTextEncoder(dim=16, max_tokens=4)
    with pytest.raises(UserError, match="text.max_tokens"):
        ToyTextEncoder(dim=64, max_tokens=2)
