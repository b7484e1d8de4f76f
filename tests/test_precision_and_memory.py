"""bf16 autocast and gradient checkpointing: the switches that trade precision or compute for
memory on large models, checked on toy sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ranke.backbones.toy import load_tokenizer
from ranke.models.gpt import GPTArgs, Transformer
from ranke.models.vq import VQ_PRESETS, VQModel, to_model_range
from ranke.runtime import UserError, autocast
from ranke.toy.data import reference_images
from ranke.train.posttrain import train_posttrain

TINY = ["prompts_per_step=2", "group_size=2", "grid_prompts=2", "eval_samples=0", "deterministic=true", "seed=3",
        "steps=2", "disc_start=1", "save_every=2", "grid_every=2"]  # fmt: skip


def gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def test_policy_gradient_checkpointing_gives_the_same_gradients_with_dropout_on(one_thread):
    """Recomputation replays each block's dropout masks (the RNG state is restored), so the
    gradients are those of the plain backward."""
    torch.manual_seed(0)
    args = GPTArgs(n_layer=2, n_head=2, dim=32, cls_token_num=3, caption_dim=16, vocab_size=40, block_size=16,
                   resid_dropout_p=0.2, ffn_dropout_p=0.2, token_dropout_p=0.0)  # fmt: skip
    model = Transformer(args)
    torch.nn.init.normal_(model.output.weight, std=0.02)
    text, tokens = torch.randn(3, 3, 16), torch.randint(0, 40, (3, 16))
    results = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = torch.nn.functional.cross_entropy(model(text, tokens, dropout=True).flatten(0, 1), tokens.flatten())
        loss.backward()
        results.append((loss.detach(), gradients(model)))
    (plain_loss, plain), (recomputed_loss, recomputed) = results
    assert torch.equal(plain_loss, recomputed_loss)
    assert plain.keys() == recomputed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-7, msg=name)


def test_decoder_gradient_checkpointing_gives_the_same_gradients(one_thread):
    torch.manual_seed(0)
    vq = VQModel(VQ_PRESETS["toy"])
    codes = torch.randint(0, vq.args.codebook_size, (2, 8, 8))
    results = []
    for checkpointing in (False, True):
        vq.decoder.gradient_checkpointing = checkpointing
        vq.zero_grad(set_to_none=True)
        vq.decode_codes(codes).square().mean().backward()
        results.append(gradients(vq.decoder))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=0, atol=1e-7, msg=name)


def test_tokenizer_codes_and_pixels_under_bf16_autocast(one_thread):
    """The nearest-code search stays float32 under autocast, so images get the codes they get in
    float32; decoded pixels come back float32 (they feed losses and rewards)."""
    tokenizer = load_tokenizer()
    images = torch.from_numpy(reference_images(n=16).copy()).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        codes = tokenizer.encode_codes(to_model_range(images))
        with autocast(torch.device("cpu"), "bf16"):
            codes_bf16 = tokenizer.encode_codes(to_model_range(images))
            pixels = tokenizer.decode_codes(codes)
    agreement = (codes == codes_bf16).float().mean().item()
    assert agreement > 0.97, agreement  # only near-ties between two codes may flip (the encoder runs in bf16)
    assert pixels.dtype == torch.float32


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_posttrain_with_gradient_checkpointing_is_exactly_the_plain_run(tmp_path, one_thread):
    train_posttrain("toy", str(tmp_path / "plain"), TINY)
    train_posttrain("toy", str(tmp_path / "recompute"), [*TINY, "policy_grad_checkpointing=true",
                                                          "decoder_grad_checkpointing=true"])  # fmt: skip
    for stem in ("policy", "vq", "discriminator"):
        plain = load_file(tmp_path / "plain" / "checkpoints" / "step_000002" / f"{stem}.safetensors")
        recomputed = load_file(tmp_path / "recompute" / "checkpoints" / "step_000002" / f"{stem}.safetensors")
        for name in plain:
            torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-6, msg=f"{stem}.{name}")


def test_posttrain_in_bf16_trains_both_stages_with_float32_losses(tmp_path, one_thread):
    out = tmp_path / "bf16"
    train_posttrain("toy", str(out), [*TINY, "precision=bf16", "mode=both"])
    rows = records(out)
    first, last = rows[0], rows[-1]
    assert first["policy/kl"] == 0.0  # the reference's bf16 log-probs are the policy's own
    assert first["policy/ratio_mean"] == pytest.approx(1.0, abs=2e-2)  # bf16 sampler vs bf16 teacher forcing
    for row in rows:
        assert all(value == value and abs(value) != float("inf") for value in row.values())
    assert last["decoder/rank_gan"] != 0.0 and last["decoder/consistency"] >= 0.0
    weights = load_file(out / "checkpoints" / "step_000002" / "policy.safetensors")["layers.0.attention.wqkv.weight"]
    assert weights.dtype == torch.float32  # fp32 master weights, bf16 only inside forward passes


@pytest.mark.parametrize(
    "override, message",
    [("precision=fp16", "config key 'precision' is 'fp16'; allowed: one of auto, fp32, bf16"),
     ("policy_sharding=zero3", "config key 'posttrain.policy_sharding' is 'zero3'; allowed: one of ddp, fsdp")],
)  # fmt: skip
def test_bad_precision_or_sharding_is_one_clear_error(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        train_posttrain("toy", str(tmp_path / "bad"), [*TINY, override])
