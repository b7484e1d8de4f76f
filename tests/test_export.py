"""`ranke export`: round trips through LlamaGen's official .pt layout and a transformers Janus folder.

LlamaGen: a real (toy-sized) post-training run, exported, checked by `ranke check-checkpoint`,
reloaded the way LlamaGen's sampler loads it, then logits and decodes compared with the run's own
models. Janus: a checkpoint of a tiny random Janus whose policy and decoder moved away from the
base, exported, reloaded by `JanusForConditionalGeneration.from_pretrained`, compared likewise.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from ranke import config as config_lib
from ranke.cli import main
from ranke.config import BackboneConfig, RunConfig
from ranke.sample_folder import ModelChoice, load_backbone
from ranke.models.gpt import GPT_PRESETS, Transformer
from ranke.models.vq import VQ_PRESETS, VQModel
from ranke import checkpoint as checkpoint_lib
from ranke.train.posttrain import train_posttrain

from test_janus import PROMPTS, janus_dir  # noqa: F401 (fixture)
from test_posttrain import TINY


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("toy_run")
    overrides = [*TINY, "mode=both", "steps=2", "save_every=2", "grid_every=2", "disc_start=0", "eval_samples=6"]
    train_posttrain("toy", str(out), overrides)
    return out


def test_llamagen_export_round_trip(toy_run, tmp_path, capsys):
    out = tmp_path / "export"
    main(["export", str(toy_run), "--format", "llamagen", "--out", str(out), "--policy", "ema", "--decoder", "online"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 2 and sorted(summary["files"]) == ["README.md", "gpt.pt", "vq.pt"]

    for kind, name in (("gpt", "gpt.pt"), ("vq", "vq.pt")):
        main(["check-checkpoint", "--kind", kind, "--preset", "toy", str(out / name)])
        assert capsys.readouterr().out.startswith("ok ")

    # as LlamaGen's sampler loads them: torch.load, the "model" entry, load_state_dict
    policy = Transformer(GPT_PRESETS["toy"])
    policy.load_state_dict(torch.load(out / "gpt.pt", map_location="cpu", weights_only=True)["model"])
    vq = VQModel(VQ_PRESETS["toy"])
    vq.load_state_dict(torch.load(out / "vq.pt", map_location="cpu", weights_only=True)["model"])
    choice = ModelChoice(checkpoint=str(toy_run), policy="ema", decoder="online", overrides=("device=cpu",))
    reference, _ = load_backbone(choice)
    text, mask = reference.encode_prompts(["a picture of a large red triangle", "a small yellow circle"])
    tokens = torch.randint(256, (2, policy.args.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(policy.eval()(text, tokens, mask), reference.policy(text, tokens, mask))
        assert torch.equal(vq.eval().decode_codes(tokens), reference.tokenizer.decode_codes(tokens))
        online, _ = load_backbone(ModelChoice(checkpoint=str(toy_run), overrides=("device=cpu",)))
        assert not torch.equal(online.policy(text, tokens, mask), reference.policy(text, tokens, mask))


def test_llamagen_model_card_holds_config_steps_and_last_evaluation(toy_run, tmp_path):
    out = tmp_path / "export"
    main(["export", str(toy_run / "checkpoints" / "step_000002"), "--format", "llamagen", "--out", str(out)])
    card = (out / "README.md").read_text()
    assert "step 2 of a `mode=both`" in card and "policy weights `online`, decoder `online`" in card
    evaluation = json.loads(card.split("## Last evaluation")[1].split("```json")[1].split("```")[0])
    logged = [json.loads(line) for line in (toy_run / "eval.jsonl").read_text().splitlines()]
    assert evaluation == [record for record in logged if record["step"] == 2]
    assert {record["decoder"] for record in evaluation} == {"ema", "online"}
    config_block = card.split("## Run config")[1].split("```yaml")[1].split("```")[0]
    assert config_lib.build(RunConfig, yaml.safe_load(config_block)) == config_lib.load(RunConfig, str(toy_run / "config.yaml"))
    assert "ranke check-checkpoint --kind gpt --preset toy gpt.pt" in card


def test_export_refuses_bad_requests_with_one_line(toy_run, tmp_path, capsys):
    cases = [
        (["--format", "hf", "--out", str(tmp_path / "a")], "a toy run exports as --format llamagen, not hf"),
        (["--format", "llamagen", "--out", str(tmp_path)], "exists and is not empty"),
    ]
    (tmp_path / "occupied").write_text("x")
    for flags, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(toy_run), *flags])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "nowhere"), "--format", "llamagen", "--out", str(tmp_path / "b")])
    assert "neither a post-training run nor a checkpoint" in capsys.readouterr().err


def _moved(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The state with every float tensor nudged, as training would leave it."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: value + 0.05 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in state.items()
    }


def test_janus_export_loads_with_from_pretrained(janus_dir, tmp_path, capsys):
    from transformers import JanusForConditionalGeneration

    from ranke.backbones.janus import load_janus_backbone

    base = load_janus_backbone(janus_dir)[0]
    tensors = {
        "policy": _moved(base.policy.state_dict(), 1), "policy_ema": _moved(base.policy.state_dict(), 2),
        "vq": _moved(base.tokenizer.state_dict(), 3), "vq_ema": _moved(base.tokenizer.state_dict(), 4),
    }  # fmt: skip
    cfg = RunConfig(backbone=BackboneConfig(kind="janus", model_path=str(janus_dir)))
    run = tmp_path / "run"
    checkpoint_lib.save_checkpoint(run, 7, tensors, {"step": 7}, yaml.safe_dump(config_lib.to_dict(cfg)))
    out = tmp_path / "janus_export"
    main(["export", str(run), "--format", "hf", "--out", str(out), "--decoder", "ema"])
    assert json.loads(capsys.readouterr().out)["step"] == 7
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()

    exported = JanusForConditionalGeneration.from_pretrained(out)
    original = JanusForConditionalGeneration.from_pretrained(janus_dir)
    untouched = "model.vision_model.embeddings.patch_embedding.weight"
    assert torch.equal(exported.state_dict()[untouched], original.state_dict()[untouched])

    reloaded = load_janus_backbone(out)[0]
    expected = load_janus_backbone(janus_dir)[0]
    expected.policy.load_state_dict(tensors["policy"])
    expected.tokenizer.load_state_dict(tensors["vq_ema"])
    ids, mask = reloaded.encode_prompts(PROMPTS)
    tokens = torch.randint(reloaded.tokenizer.args.codebook_size, (len(PROMPTS), reloaded.policy.num_image_tokens))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.policy(ids, tokens, mask), expected.policy(ids, tokens, mask), rtol=0, atol=0)
        torch.testing.assert_close(reloaded.decode(tokens), expected.decode(tokens), rtol=0, atol=0)
        assert not torch.equal(reloaded.decode(tokens), base.decode(tokens))
