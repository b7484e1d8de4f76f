"""The model choice travels whole from the command line to the loaded weights: a post-training
checkpoint's EMA policy with its online decoder (two different copies, so a swap of policy and
decoder changes the images) samples exactly what those two weights sample, in `ranke sample` and
in every evaluation protocol. The reference backbone gets the weights by hand, from the saved
state dicts, not through `ModelChoice`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_sample_folder import ON_CPU, posttrain_run  # noqa: F401 (fixture)
from test_geneval import TOY_METADATA, write_metadata
from test_rewards import _FakeOpenCLIP, fake_open_clip  # noqa: F401 (fixture)

from ranke.cli import main
from ranke.eval.prompt_set import HPSV2_STYLES
from ranke.sample_folder import ModelChoice, batch_seed, load_backbone
from ranke.images import grid_tiles
from ranke.toy.data import heldout_prompts
from ranke.toy.tools import CAPTIONS_FILE, write_samples

CHOICE = ["--policy", "ema", "--decoder", "online"]
SEED, BATCH = "3", "2"


def _backbone_with(run, policy_state: dict, decoder_state: dict):
    backbone, cfg = load_backbone(ModelChoice(checkpoint=str(run), overrides=ON_CPU))
    backbone.policy.load_state_dict(policy_state)
    backbone.tokenizer.load_state_dict(decoder_state)
    return backbone, cfg.sampling


@pytest.fixture(scope="module")
def chosen(posttrain_run):  # noqa: F811
    """(run, the backbone with the newest checkpoint's EMA policy and online decoder, the same
    with the two swapped: online policy, EMA decoder)."""
    run, states, _ = posttrain_run
    newest = states[10]
    wanted = _backbone_with(run, newest["policy_ema"], newest["vq"])
    swapped = _backbone_with(run, newest["policy"], newest["vq_ema"])
    return run, wanted, swapped


def expected_pixels(reference, prompts: list[str], seed: int = int(SEED), batch_size: int = int(BATCH)) -> np.ndarray:
    """uint8 [N, H, W, 3]: the images a sampling command draws (batch k from `batch_seed(seed, k)`)."""
    backbone, sampling = reference
    images = []
    with torch.no_grad():
        for batch, start in enumerate(range(0, len(prompts), batch_size)):
            generator = torch.Generator().manual_seed(batch_seed(seed, batch))
            emb, mask = backbone.encode_prompts(prompts[start : start + batch_size])
            tokens = backbone.sample(emb, mask, sampling, generator).tokens
            images.append((backbone.decode(tokens).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy())
    return np.concatenate(images)


def assert_sampled_by(folder, chosen) -> None:
    """The images of a sample folder (its captions.jsonl, in order) are the wanted model's, and not the swapped one's."""
    _, wanted, swapped = chosen
    records = [json.loads(line) for line in (folder / CAPTIONS_FILE).read_text().splitlines()]
    written = np.stack([np.asarray(Image.open(folder / record["file"]).convert("RGB")) for record in records])
    prompts = [record["caption"] for record in records]
    assert np.array_equal(written, expected_pixels(wanted, prompts))
    assert not np.array_equal(written, expected_pixels(swapped, prompts))


def run_cli(capsys, *argv: str) -> dict:
    main(list(argv))
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_sample_loads_the_chosen_policy_and_decoder(chosen, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(heldout_prompts()[:3]) + "\n")
    out = tmp_path / "out"
    summary = run_cli(capsys, "sample", "--ckpt", str(chosen[0]), *CHOICE, "--prompts", str(prompts), "--out", str(out),
                      "--seed", SEED, "--batch-size", BATCH, "device=cpu")  # fmt: skip
    assert (summary["policy"], summary["decoder"]) == ("ema", "online")
    assert_sampled_by(out, chosen)


def test_coco30k_protocol_loads_the_chosen_policy_and_decoder(chosen, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(heldout_prompts()[:6]) + "\n")  # 6: precision / recall's 5 nearest neighbours
    write_samples(6, tmp_path / "reference", split="heldout", seed=0)
    out = tmp_path / "eval"
    metrics = run_cli(capsys, "eval", "--protocol", "coco30k", "--ckpt", str(chosen[0]), *CHOICE,
                      "--captions", str(prompts), "--n", "6", "--ref-dir", str(tmp_path / "reference"),
                      "--features", "toy", "--out", str(out), "--seed", SEED, "--batch-size", BATCH, "device=cpu")  # fmt: skip
    assert (metrics["policy"], metrics["decoder"]) == ("ema", "online")
    assert_sampled_by(out / "images", chosen)


def test_hpsv2_protocol_loads_the_chosen_policy_and_decoder(chosen, tmp_path, capsys, fake_open_clip):  # noqa: F811
    prompts = heldout_prompts()[:8]
    for index, style in enumerate(HPSV2_STYLES):
        (tmp_path / f"{style}.json").write_text(json.dumps(prompts[2 * index : 2 * index + 2]))
    checkpoint = tmp_path / "hps.pt"
    torch.save(_FakeOpenCLIP().state_dict(), checkpoint)
    out = tmp_path / "eval"
    metrics = run_cli(capsys, "eval", "--protocol", "hpsv2", "--ckpt", str(chosen[0]), *CHOICE,
                      "--prompts-dir", str(tmp_path), "--hpsv2-path", str(checkpoint), "--out", str(out),
                      "--seed", SEED, "--batch-size", BATCH, "device=cpu")  # fmt: skip
    assert (metrics["policy"], metrics["decoder"]) == ("ema", "online")
    for style in HPSV2_STYLES:
        assert_sampled_by(out / "images" / style, chosen)


def test_geneval_protocol_loads_the_chosen_policy_and_decoder(chosen, tmp_path, capsys):
    metadata = write_metadata(tmp_path / "evaluation_metadata.jsonl", TOY_METADATA)
    out = tmp_path / "geneval"
    summary = run_cli(capsys, "eval", "--protocol", "geneval", "--ckpt", str(chosen[0]), *CHOICE, "--metadata", metadata,
                      "--n-per-prompt", "1", "--out", str(out), "--seed", SEED, "--batch-size", BATCH, "device=cpu")  # fmt: skip
    assert (summary["policy"], summary["decoder"]) == ("ema", "online")
    assert_sampled_by(out, chosen)


def test_toy_protocol_loads_the_chosen_policy_and_decoder(chosen, tmp_path, capsys):
    """The toy protocol keeps no image files: its sample grid shows the first images."""
    out = tmp_path / "eval"
    metrics = run_cli(capsys, "eval", "--ckpt", str(chosen[0]), *CHOICE, "--n", "6", "--out", str(out),
                      "--seed", SEED, "--batch-size", BATCH, "device=cpu")  # fmt: skip
    assert (metrics["policy"], metrics["decoder"]) == ("ema", "online")
    tiles = grid_tiles(np.asarray(Image.open(out / "samples.png").convert("RGB")), 6)
    _, wanted, swapped = chosen
    assert np.array_equal(tiles, expected_pixels(wanted, heldout_prompts()[:6]))
    assert not np.array_equal(tiles, expected_pixels(swapped, heldout_prompts()[:6]))
