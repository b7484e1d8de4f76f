"""VQ tokenizer: LlamaGen layout, quantizer maths, shapes, freezing."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ranke.models.vq import (
    USAGE_WINDOW,
    VQ_PRESETS,
    VectorQuantizer,
    VQArgs,
    VQModel,
    to_model_range,
    to_unit_range,
)
from ranke.runtime import UserError

LAYOUTS = Path(__file__).parent / "data" / "llamagen_layouts.json"


def _quantizer(codebook: list[list[float]], l2_norm: bool, beta: float = 0.25) -> VectorQuantizer:
    quantizer = VectorQuantizer(len(codebook), len(codebook[0]), beta=beta, l2_norm=l2_norm)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.tensor(codebook))
    return quantizer


def _grid(vectors: list[list[float]]) -> torch.Tensor:
    """Vectors [N, d] -> a [1, d, 1, N] feature map (one row of N positions)."""
    return torch.tensor(vectors).t().reshape(1, len(vectors[0]), 1, len(vectors))


def test_vq16_state_dict_equals_official_layout():
    official = {key: tuple(shape) for key, shape in json.loads(LAYOUTS.read_text())["VQ-16"]}
    with torch.device("meta"):
        model = VQModel(VQ_PRESETS["VQ-16"])
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert len(official) == 344
    assert ours == official
    assert ours["quantize.codebook_used"] == (65536,)
    assert ours["quantize.embedding.weight"] == (16384, 8)


def test_quantizer_picks_nearest_normalised_code():
    # Raw codes of very different lengths: cosine and raw-l2 nearest neighbours disagree.
    codebook = [[1.0, 0.0], [0.0, 5.0], [-2.0, 0.0], [0.0, -1.0]]
    z = _grid([[0.3, 0.4], [-4.0, 1.0], [0.1, -0.3]])
    z_q, _, codes = _quantizer(codebook, l2_norm=True)(z)
    assert codes.tolist() == [[[1, 2, 3]]]
    expected = _grid([[0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    torch.testing.assert_close(z_q, expected)
    # Without normalisation, [0.3, 0.4] is closest to the short code [1, 0].
    _, _, raw_codes = _quantizer(codebook, l2_norm=False)(z)
    assert raw_codes[0, 0, 0].item() == 0


def test_straight_through_gradient_is_identity():
    torch.manual_seed(0)
    upstream = torch.randn(2, 4, 3, 3)
    quantizer = VectorQuantizer(16, 4, beta=0.25, l2_norm=False)
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, _, _ = quantizer(z_e)
    z_q.retain_grad()
    (z_q * upstream).sum().backward()
    torch.testing.assert_close(z_e.grad, z_q.grad)
    torch.testing.assert_close(z_e.grad, upstream)

    # With l2_norm the identity holds on the normalised vectors: d/dz_e = normalize's VJP of d/dz_q.
    quantizer = VectorQuantizer(16, 4, beta=0.25, l2_norm=True)
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    quantizer(z_e)[0].mul(upstream).sum().backward()
    reference = z_e.detach().clone().requires_grad_(True)
    F.normalize(reference, dim=1).mul(upstream).sum().backward()
    torch.testing.assert_close(z_e.grad, reference.grad)


def test_codebook_and_commitment_loss_values():
    quantizer = _quantizer([[1.0, 0.0], [0.0, 1.0]], l2_norm=False, beta=0.25)
    z = _grid([[0.5, 0.2], [-0.1, 0.9]]).requires_grad_(True)
    _, losses, codes = quantizer(z)
    assert codes.tolist() == [[[0, 1]]]
    # Squared errors: (0.5^2 + 0.2^2) + (0.1^2 + 0.1^2) = 0.31, over 4 elements.
    assert losses.codebook.item() == pytest.approx(0.0775)
    assert losses.commitment.item() == pytest.approx(0.25 * 0.0775)
    assert losses.total.item() == pytest.approx(1.25 * 0.0775)

    # The codebook term moves codes only, the commitment term moves the encoder only.
    losses.codebook.backward(retain_graph=True)
    assert z.grad is None
    torch.testing.assert_close(quantizer.embedding.weight.grad, torch.tensor([[0.25, -0.1], [0.05, 0.05]]))
    losses.commitment.backward()
    torch.testing.assert_close(z.grad, 0.25 * _grid([[-0.25, 0.1], [-0.05, -0.05]]))


def test_usage_window_records_training_codes_only():
    quantizer = _quantizer([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], l2_norm=True)
    z = _grid([[1.0, 0.1], [0.9, 0.0], [0.0, -2.0]])
    quantizer.eval()
    quantizer(z)
    assert quantizer.codebook_usage() == 0.0
    quantizer.train()
    quantizer(z)
    assert quantizer.codebook_used[-3:].tolist() == [0.0, 0.0, 3.0]
    assert (quantizer.codebook_used[: USAGE_WINDOW - 3] == -1).all()
    assert quantizer.codebook_usage() == 0.5


def test_restart_dead_codes_reseeds_unused_codes_only():
    quantizer = _quantizer([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], l2_norm=True)
    quantizer.train()
    quantizer(_grid([[1.0, 0.1], [0.1, 1.0]]))  # uses codes 0 and 1
    restarted = quantizer.restart_dead_codes(_grid([[3.0, 4.0], [3.0, 4.0]]))
    assert restarted == 2
    torch.testing.assert_close(
        quantizer.embedding.weight, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.6, 0.8]])
    )
    quantizer(_grid([[0.6, 0.8]]))  # code 2 wins the tie with code 3, which stays unused
    assert quantizer.restart_dead_codes(_grid([[-1.0, 0.0]])) == 1
    torch.testing.assert_close(quantizer.embedding.weight[3], torch.tensor([-1.0, 0.0]))


def test_toy_encode_decode_shapes_round_trip():
    torch.manual_seed(0)
    model = VQModel(VQ_PRESETS["toy"]).eval()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        quant, losses, codes = model.encode(images)
        assert quant.shape == (2, 8, 8, 8)
        assert codes.shape == (2, 8, 8) and codes.dtype == torch.int64
        assert 0 <= codes.min() and codes.max() < 1024
        assert losses.total.ndim == 0
        torch.testing.assert_close(model.codebook_entries(codes), quant)
        decoded = model.decode(quant)
        assert decoded.shape == (2, 3, 64, 64)
        # The straight-through sum z + (z_q - z) equals z_q up to float rounding.
        torch.testing.assert_close(model.decode_codes(codes), decoded, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.decode_codes(codes.reshape(2, 64)), model.decode_codes(codes))
        assert torch.equal(model.encode_codes(images), codes)
    assert VQ_PRESETS["toy"].downsample_factor == 8
    assert VQ_PRESETS["VQ-16"].downsample_factor == 16


def test_freeze_token_space_leaves_decoder_side_trainable():
    model = VQModel(VQ_PRESETS["toy"])
    model.freeze_token_space()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("decoder.", "post_quant_conv.")) for n in trainable)
    decoder_side = {id(p) for p in model.decoder_parameters()}
    assert decoder_side == {id(p) for p in model.parameters() if p.requires_grad}
    assert model.last_layer is model.decoder.conv_out.weight

    reconstruction, losses, _ = model(torch.rand(1, 3, 64, 64) * 2 - 1)
    (reconstruction.abs().mean() + losses.total).backward()
    assert model.encoder.conv_in.weight.grad is None
    assert model.decoder.conv_out.weight.grad is not None


def test_range_helpers():
    unit = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(to_model_range(unit), torch.tensor([-1.0, -0.5, 1.0]))
    torch.testing.assert_close(to_unit_range(to_model_range(unit)), unit)
    torch.testing.assert_close(to_unit_range(torch.tensor([-1.5, 1.2])), torch.tensor([0.0, 1.0]))


def test_invalid_args_are_user_errors():
    with pytest.raises(UserError, match="same length"):
        VQArgs(encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2, 4))
    with pytest.raises(UserError, match="norm_groups"):
        VQArgs(base_channels=20)
