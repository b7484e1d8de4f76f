"""VQGAN loss terms, PatchGAN discriminator and perceptual distances."""

import math

import pytest
import torch
import torch.nn.functional as F

from ranke.algo.vqgan import (
    adaptive_generator_weight,
    adopt_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    object_pixel_weight,
    reconstruction_loss,
)
from ranke.models.discriminator import PatchDiscriminator
from ranke.models.perceptual import (
    LPIPS,
    LPIPS_TAP_CHANNELS,
    NoPerceptual,
    PyramidDistance,
    _vgg16_features,
    build_perceptual,
)
from ranke.runtime import UserError


def test_reconstruction_loss_values():
    x = torch.tensor([0.0, 1.0, 2.0])
    x_hat = torch.tensor([1.0, 1.0, 0.0])
    assert reconstruction_loss(x, x_hat, "l1").item() == pytest.approx(1.0)
    assert reconstruction_loss(x, x_hat, "l2").item() == pytest.approx(5.0 / 3.0)
    with pytest.raises(ValueError, match="l1"):
        reconstruction_loss(x, x_hat, "huber")


def test_weighted_reconstruction_loss_by_hand():
    x = torch.tensor([0.0, 1.0, 2.0])
    x_hat = torch.tensor([1.0, 1.0, 0.0])
    weight = torch.tensor([3.0, 5.0, 0.5])
    # l1: (3 * 1 + 5 * 0 + 0.5 * 2) / 3; l2: (3 * 1 + 5 * 0 + 0.5 * 4) / 3
    assert reconstruction_loss(x, x_hat, "l1", pixel_weight=weight).item() == pytest.approx(4.0 / 3.0)
    assert reconstruction_loss(x, x_hat, "l2", pixel_weight=weight).item() == pytest.approx(5.0 / 3.0)
    ones = torch.ones(3)
    assert reconstruction_loss(x, x_hat, "l2", pixel_weight=ones).item() == pytest.approx(5.0 / 3.0)


def test_object_pixel_weight_by_hand():
    # One row of 6 pixels on the [0, 1] scale: grey, an object pixel (chroma 0.7), grey, grey,
    # a pale pixel (chroma 0.2, under the 0.3 threshold), an object pixel (chroma 0.35).
    row = torch.tensor(
        [
            [0.5, 0.5, 0.5],
            [0.9, 0.2, 0.3],
            [0.4, 0.4, 0.4],
            [0.6, 0.6, 0.6],
            [0.6, 0.5, 0.4],
            [0.3, 0.65, 0.45],
        ]
    )
    x = (row.t().reshape(1, 3, 1, 6) * 2 - 1).requires_grad_(True)
    weight = object_pixel_weight(x, object_weight=4.0, margin=0)
    assert weight.shape == (1, 1, 1, 6)
    torch.testing.assert_close(weight.flatten(), torch.tensor([1.0, 5.0, 1.0, 1.0, 1.0, 5.0]))
    # A margin of 1 pixel grows each object pixel to its neighbours (the image border is not wrapped).
    grown = object_pixel_weight(x, object_weight=4.0, margin=1)
    torch.testing.assert_close(grown.flatten(), torch.tensor([5.0, 5.0, 5.0, 1.0, 5.0, 5.0]))
    assert not grown.requires_grad


def test_hinge_losses_by_hand():
    logits_real = torch.tensor([0.5, -1.0])
    logits_fake = torch.tensor([2.0, -3.0])
    # real: relu(1 - 0.5) = 0.5, relu(1 + 1) = 2 -> 1.25; fake: relu(1 + 2) = 3, relu(1 - 3) = 0 -> 1.5
    assert hinge_discriminator_loss(logits_real, logits_fake).item() == pytest.approx(0.5 * (1.25 + 1.5))
    assert hinge_generator_loss(logits_fake).item() == pytest.approx(0.5)


def test_adaptive_generator_weight_is_gradient_norm_ratio():
    weight = torch.tensor([1.0, -2.0], requires_grad=True)
    recon = (torch.tensor([3.0, 4.0]) * weight).sum()  # gradient norm 5
    gen = (torch.tensor([0.6, 0.8]) * weight).sum()  # gradient norm 1
    balance = adaptive_generator_weight(recon, gen, weight)
    assert balance.item() == pytest.approx(5.0 / (1.0 + 1e-4))
    assert not balance.requires_grad
    # The graphs are kept for the caller's backward.
    (recon + balance * gen).backward()
    torch.testing.assert_close(weight.grad, torch.tensor([3.0, 4.0]) + balance * torch.tensor([0.6, 0.8]))

    recon = (torch.tensor([3.0, 4.0]) * weight).sum()
    flat_gen = (0.0 * weight).sum()  # zero gradient: 5 / 1e-4 = 5e4, clamped
    assert adaptive_generator_weight(recon, flat_gen, weight).item() == pytest.approx(1e4)
    assert adaptive_generator_weight(recon, flat_gen, weight, max_weight=100.0).item() == pytest.approx(100.0)


def test_adopt_weight_starts_at_step():
    assert adopt_weight(99, start=100) == 0.0
    assert adopt_weight(100, start=100) == 1.0
    assert adopt_weight(0, start=0) == 1.0


def test_patch_discriminator_shapes_layout_and_init():
    torch.manual_seed(0)
    disc = PatchDiscriminator()
    assert disc(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert disc(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    # taming / LlamaGen NLayerDiscriminator keys: convs at main.0, 2, 5, 8, 11; BatchNorm at 3, 6, 9.
    shapes = {k: tuple(v.shape) for k, v in disc.state_dict().items()}
    assert shapes["main.0.weight"] == (64, 3, 4, 4) and "main.0.bias" in shapes
    assert shapes["main.2.weight"] == (128, 64, 4, 4) and "main.2.bias" not in shapes
    assert shapes["main.8.weight"] == (512, 256, 4, 4)
    assert shapes["main.9.running_mean"] == (512,)
    assert shapes["main.11.weight"] == (1, 512, 4, 4)
    # 3*64*16 + 64 + 64*128*16 + 2*128 + 128*256*16 + 2*256 + 256*512*16 + 2*512 + 512*16 + 1
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    assert disc.main[8].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert disc.main[9].weight.mean().item() == pytest.approx(1.0, abs=0.01)


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random weights in the torchvision VGG16 and lpips linear-head layouts."""
    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    vgg = {f"features.{k}": v for k, v in _vgg16_features().state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision's full VGG16 file also has the classifier
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(LPIPS_TAP_CHANNELS)}
    torch.save(vgg, folder / "vgg16.pth")
    torch.save(lin, folder / "lpips_lin.pth")
    return folder / "vgg16.pth", folder / "lpips_lin.pth"


def test_lpips_with_local_weights(lpips_files):
    vgg_path, lin_path = lpips_files
    lpips = build_perceptual("lpips", vgg_path, lin_path)
    assert isinstance(lpips, LPIPS) and not any(p.requires_grad for p in lpips.parameters())
    torch.manual_seed(1)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips(x, x).tolist() == [0.0, 0.0]
    distance = lpips(x, y)
    assert distance.shape == (2,) and (distance > 0).all()
    distance.sum().backward()
    assert x.grad.abs().sum() > 0

    # Only the first head active: distance = spatial mean of lin0-weighted squared unit-feature differences.
    with torch.no_grad():
        for lin in lpips.lins[1:]:
            lin.weight.zero_()
        scaled = (torch.cat([x, y]) - lpips.shift) / lpips.scale
        relu1_2 = lpips.features[:4](scaled)
        unit = relu1_2 / relu1_2.norm(dim=1, keepdim=True)
        expected = ((unit[:2] - unit[2:]) ** 2 * lpips.lins[0].weight.view(1, -1, 1, 1)).sum(1).mean((1, 2))
        torch.testing.assert_close(lpips(x, y), expected)


def test_lpips_missing_or_wrong_files_are_user_errors(lpips_files, tmp_path):
    vgg_path, lin_path = lpips_files
    with pytest.raises(UserError, match="needs VGG16 weights"):
        build_perceptual("lpips", None, lin_path)
    with pytest.raises(UserError, match="not found"):
        build_perceptual("lpips", vgg_path, tmp_path / "nope.pth")
    torch.save({"lin0.model.0.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match=r"wrong layout: missing: lin0.model.1.weight \[1, 64, 1, 1\]"):
        build_perceptual("lpips", vgg_path, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="unknown perceptual"):
        build_perceptual("vgg")


def _textured_images() -> torch.Tensor:
    torch.manual_seed(0)
    coords = torch.linspace(0, 1, 64)
    stripes = torch.sin(2 * math.pi * 6 * coords).view(1, 1, 1, 64).expand(2, 3, 64, 64)
    return (0.5 * stripes + 0.3 * torch.randn(2, 3, 64, 64)).clamp(-1, 1)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma) + 1
    taps = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * sigma**2))
    kernel = (taps[:, None] * taps[None, :]) / taps.sum() ** 2
    kernel = kernel.expand(3, 1, *kernel.shape)
    return F.conv2d(F.pad(images, (radius,) * 4, mode="reflect"), kernel, groups=3)


def test_pyramid_distance_properties():
    pyramid = build_perceptual("pyramid")
    assert isinstance(pyramid, PyramidDistance)
    images = _textured_images()
    assert pyramid(images, images).abs().max().item() < 1e-6
    other = images.flip(-1)
    torch.testing.assert_close(pyramid(images, other), pyramid(other, images))
    distances = [pyramid(images, _gaussian_blur(images, sigma)).mean().item() for sigma in (0.5, 1.0, 2.0, 4.0)]
    assert distances == sorted(distances) and distances[0] > 0.02


def test_pyramid_distance_of_flat_images_by_hand():
    # Flat images have no band-pass energy and zero variance: distance = 1 - (2ab + C1) / (a^2 + b^2 + C1)
    # at every scale, with a, b the [0, 1] intensities.
    x = torch.full((1, 3, 32, 32), -0.5)  # 0.25 in [0, 1]
    y = torch.full((1, 3, 32, 32), 0.5)  # 0.75 in [0, 1]
    c1 = 0.01**2
    expected = 1 - (2 * 0.25 * 0.75 + c1) / (0.25**2 + 0.75**2 + c1)
    # float32 variances (E[x^2] - mu^2) carry ~1e-7 errors, amplified by 1 / C2.
    assert PyramidDistance()(x, y).item() == pytest.approx(expected, abs=5e-4)
    with pytest.raises(ValueError, match="at least 28 pixels"):
        PyramidDistance()(x[..., :16, :16], y[..., :16, :16])


def test_no_perceptual_is_zero():
    none = build_perceptual("none")
    assert isinstance(none, NoPerceptual)
    assert none(torch.zeros(3, 3, 8, 8), torch.ones(3, 3, 8, 8)).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("distance", [PyramidDistance(), NoPerceptual()], ids=["pyramid", "none"])
def test_perceptual_distance_is_float32_inside_bf16_autocast(distance):
    """The decoder stage runs under bf16 autocast; its perceptual terms compare near-equal decodes,
    which bf16 cannot resolve (the pyramid distance came out 9x too large and drove the decoder to
    NaN), so the distance is computed in float32 either way."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (x + 0.01 * torch.randn_like(x)).clamp(-1, 1)
    reference = distance(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = distance(x.bfloat16(), y)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, distance(x.bfloat16().float(), y), rtol=1e-6, atol=1e-7)
    assert reference.dtype == torch.float32


def test_default_reconstruction_is_l1():
    assert reconstruction_loss(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 1.0])).item() == pytest.approx(1.0)


def test_object_pixel_weight_defaults_threshold_and_batch():
    # two images of 1 x 7 pixels; image 0 has one object pixel in the middle, image 1 none. The
    # default margin of 2 grows it to 5 pixels; a chroma exactly at the threshold counts.
    unit = torch.full((2, 3, 1, 7), 0.5)
    unit[0, 0, 0, 3] = 0.75  # chroma 0.25
    x = unit * 2 - 1
    weight = object_pixel_weight(x, object_weight=1.0, chroma_threshold=0.25)
    assert weight.shape == (2, 1, 1, 7)
    torch.testing.assert_close(weight[0].flatten(), torch.tensor([1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.0]))
    torch.testing.assert_close(weight[1].flatten(), torch.ones(7))


def test_adaptive_generator_weight_below_one():
    weight = torch.tensor([1.0, -2.0], requires_grad=True)
    recon = (torch.tensor([0.6, 0.8]) * weight).sum()  # gradient norm 1
    gen = (torch.tensor([3.0, 4.0]) * weight).sum()  # gradient norm 5
    assert adaptive_generator_weight(recon, gen, weight).item() == pytest.approx(1.0 / (5.0 + 1e-4))
