"""Tokenizer and SFT recipes end to end at tiny sizes: outputs, exact resume, sampling from the result."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_logging import assert_tensorboard_matches_jsonl

from ranke.sample_folder import ModelChoice, sample_prompts_to_dir
from ranke.runtime import set_deterministic
from ranke.train.sft import train_sft
from ranke.train.tokenizer import train_tokenizer

TINY_VQ = [
    "device=cpu",
    "vq.codebook_size=64",
    "vq.base_channels=8",
    "vq.z_channels=16",
    "vq.norm_groups=4",
    "vq.encoder_ch_mult=[1,1,2,2]",
    "vq.decoder_ch_mult=[1,1,2,2]",
]
TINY_TOKENIZER = TINY_VQ + [
    "tokenizer.batch_size=4",
    "tokenizer.eval_images=8",
    "tokenizer.disc_start=2",
    "tokenizer.disc_channels=8",
    "tokenizer.log_every=1",
    "tokenizer.grid_every=100",
    "tokenizer.save_every=2",
    "tokenizer.restart_dead_codes_every=2",
]
TINY_GPT = ["gpt.vocab_size=64", "gpt.dim=32", "gpt.n_layer=1", "gpt.n_head=2"]


def tiny_sft(tokenizer_run, *settings: str) -> list[str]:
    """Overrides of a tiny SFT run (batch 4) on the tiny tokenizer, plus `settings`."""
    tokenizer = f"sft.tokenizer={tokenizer_run / 'toy_tokenizer.safetensors'}"
    return [*TINY_VQ, *TINY_GPT, "sft.batch_size=4", *settings, tokenizer]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    run = tmp_path_factory.mktemp("tok")
    train_tokenizer("toy", str(run), TINY_TOKENIZER + ["tokenizer.steps=4"])
    return run


def test_tokenizer_run_writes_everything(tiny_tokenizer):
    run = tiny_tokenizer
    result = json.loads((run / "eval.json").read_text())
    assert result["n"] == 8 and 0 < result["psnr"] < 60 and 0 < result["codebook_usage"] <= 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert_tensorboard_matches_jsonl(run)
    # the adversarial term starts at disc_start
    assert records[0]["generator_weight"] == 0 and records[3]["discriminator"] > 0
    assert (run / "toy_tokenizer.safetensors").is_file()
    assert (run / "reconstructions_000004.png").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"


def test_tokenizer_resume_is_exact(tmp_path):
    set_deterministic(True)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_tokenizer("toy", str(straight), TINY_TOKENIZER + ["tokenizer.steps=4"])
    train_tokenizer("toy", str(resumed), TINY_TOKENIZER + ["tokenizer.steps=2"])
    train_tokenizer("toy", str(resumed), TINY_TOKENIZER + ["tokenizer.steps=4"], resume=True)
    a = load_file(straight / "checkpoints" / "step_000004" / "vq.safetensors")
    b = load_file(resumed / "checkpoints" / "step_000004" / "vq.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)


def test_sft_then_sample_then_verify(tiny_tokenizer, tmp_path):
    run = tmp_path / "sft"
    overrides = tiny_sft(tiny_tokenizer, "sft.steps=3", "sft.eval_prompts=4", "sft.eval_samples=4", "sft.grid_every=3")
    result = train_sft("toy", str(run), overrides)
    assert result["n"] == 4 and 0 <= result["accuracy"] <= 1
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) >= 1 and all(loss > 0 for loss in losses)
    assert_tensorboard_matches_jsonl(run)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle\n\na small blue square\n")
    out = tmp_path / "samples"
    choice = ModelChoice(checkpoint=str(run), overrides=("device=cpu",))
    summary = sample_prompts_to_dir(out_dir=str(out), model=choice, prompts_file=str(prompts), n_per_prompt=2)
    assert summary["n"] == 4
    lines = (tmp_path / "samples" / "captions.jsonl").read_text().splitlines()
    assert [json.loads(line)["caption"] for line in lines] == ["a large red circle"] * 2 + ["a small blue square"] * 2


def test_sft_resume_is_exact(tiny_tokenizer, tmp_path):
    set_deterministic(True)
    run = tmp_path / "sft"
    overrides = tiny_sft(tiny_tokenizer, "sft.steps=4", "sft.warmup_steps=1", "sft.eval_prompts=2", "sft.eval_samples=2",
                         "sft.save_every=2")  # fmt: skip
    train_sft("toy", str(run), overrides)
    final = run / "checkpoints" / "step_000004"
    straight = load_file(final / "policy.safetensors")
    # as if the run had died after step 2: resuming replays steps 3-4 (data, caption dropout,
    # learning rate) bit for bit
    shutil.rmtree(final)
    (run / "checkpoints" / "latest").write_text("step_000002")
    train_sft("toy", str(run), overrides, resume=True)
    resumed = load_file(final / "policy.safetensors")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    at_step_2 = load_file(run / "checkpoints" / "step_000002" / "policy.safetensors")
    assert not torch.equal(resumed["output.weight"], at_step_2["output.weight"])


def test_tokenizer_object_weight_raises_the_pixel_loss(tmp_path):
    # Same seed, same first batch and initial model: weights >= 1 can only raise the first step's pixel loss.
    def first_recon(name, extra):
        train_tokenizer("toy", str(tmp_path / name), TINY_TOKENIZER + ["tokenizer.steps=1"] + extra)
        return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["recon"]

    plain = first_recon("plain", [])
    weighted = first_recon("weighted", ["tokenizer.object_weight=4"])
    assert plain < weighted < 5 * plain


def test_sft_bf16_matches_fp32_first_loss(tiny_tokenizer, tmp_path):
    def first_loss(precision):
        run = tmp_path / precision
        overrides = tiny_sft(tiny_tokenizer, f"precision={precision}", "sft.steps=1", "sft.eval_prompts=2", "sft.eval_samples=2")
        train_sft("toy", str(run), overrides)
        return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    assert first_loss("bf16") == pytest.approx(first_loss("fp32"), rel=0.02)
