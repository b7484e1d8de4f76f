"""LlamaGen end to end from official-layout files: random GPT-B and VQ-16 weights saved as
LlamaGen saves them (`{"model": state_dict}`), a tiny random T5 directory, then `ranke sample`
and one RankE step of `ranke posttrain` on image-caption data, on CPU.

The images are 128 px (8x8 tokens) to keep the test fast: LlamaGen's GPT weights do not depend
on the token grid (the rotary table is computed), so the layout is exactly the 256/512 px one.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_text import tiny_t5_directory

from ranke.checkpoint import latest_checkpoint
from ranke.cli import main
from ranke.models.gpt import GPT_PRESETS, Transformer
from ranke.models.vq import VQ_PRESETS, VQModel
from ranke.toy.tools import write_samples


@pytest.fixture(scope="module")
def llamagen_files(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("llamagen")
    torch.manual_seed(0)
    gpt = Transformer(GPT_PRESETS["GPT-B"])
    with torch.no_grad():
        gpt.cls_embedding.uncond_embedding.normal_(std=0.02)  # LlamaGen trains it; zeros would hide CFG bugs
    torch.save({"model": gpt.state_dict()}, root / "t2i_B_256.pt")
    torch.save({"model": VQModel(VQ_PRESETS["VQ-16"]).state_dict()}, root / "vq_ds16_t2i.pt")
    t5 = tiny_t5_directory(root / "t5", d_model=GPT_PRESETS["GPT-B"].caption_dim)
    write_samples(4, root / "data", split="train", seed=1)  # 64 px toy images, resized to 128 by the loader
    flags = ["--backbone", "llamagen", "--gpt-ckpt", str(root / "t2i_B_256.pt"), "--vq-ckpt", str(root / "vq_ds16_t2i.pt"),
             "--t5-path", str(t5), "--gpt-preset", "GPT-B", "--image-size", "128"]  # fmt: skip
    return root, flags


def test_sample_from_official_files(llamagen_files, tmp_path, capsys):
    root, flags = llamagen_files
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square left of a red circle\n")
    main(["sample", "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--cfg", "4", *flags])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 2
    captions = [json.loads(line) for line in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    assert [c["caption"] for c in captions] == ["a red circle", "a blue square left of a red circle"]
    from PIL import Image

    assert Image.open(tmp_path / "out" / captions[0]["file"]).size == (128, 128)


def test_one_ranke_step_changes_policy_and_decoder(llamagen_files, tmp_path):
    root, flags = llamagen_files
    run = tmp_path / "run"
    main(["posttrain", "--out", str(run), *flags, f"data={root / 'data'}", "mode=both", "steps=1", "prompts_per_step=1",
          "group_size=2", "disc_start=0", "eval_samples=0", "grid_prompts=1", "policy_lr=1e-3", "decoder_lr=1e-3"])  # fmt: skip
    checkpoint = latest_checkpoint(run)
    start_gpt = torch.load(root / "t2i_B_256.pt", weights_only=True)["model"]
    start_vq = torch.load(root / "vq_ds16_t2i.pt", weights_only=True)["model"]
    policy, vq = load_file(checkpoint / "policy.safetensors"), load_file(checkpoint / "vq.safetensors")
    assert not torch.equal(policy["layers.0.attention.wqkv.weight"], start_gpt["layers.0.attention.wqkv.weight"])
    assert not torch.equal(vq["decoder.conv_out.weight"], start_vq["decoder.conv_out.weight"])
    assert torch.equal(vq["quantize.embedding.weight"], start_vq["quantize.embedding.weight"])
    assert torch.equal(vq["encoder.conv_in.weight"], start_vq["encoder.conv_in.weight"])
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert all(torch.isfinite(torch.tensor(v)) for k, v in record.items() if k.startswith(("policy/", "decoder/")))
    # the post-trained models exported in LlamaGen's own layout, accepted by check-checkpoint at GPT-B / VQ-16
    export = tmp_path / "export"
    main(["export", str(run), "--format", "llamagen", "--out", str(export)])
    for kind, preset, name in (("gpt", "GPT-B", "gpt.pt"), ("vq", "VQ-16", "vq.pt")):
        main(["check-checkpoint", "--kind", kind, "--preset", preset, str(export / name)])
    exported = torch.load(export / "gpt.pt", weights_only=True)["model"]
    assert torch.equal(exported["layers.0.attention.wqkv.weight"], policy["layers.0.attention.wqkv.weight"])
    assert "--gpt-model GPT-B --image-size 128" in (export / "README.md").read_text()
