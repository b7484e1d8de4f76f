"""Loading a backbone from every source `ranke sample` / `ranke eval` accept, post-training
checkpoints (online / EMA policy, online / EMA / base decoder) included."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ranke import checkpoint as checkpoint_lib
from ranke import config as config_lib
from ranke.assets import save_asset
from ranke.config import RunConfig
from ranke.sample_folder import ModelChoice, batch_seed, load_backbone, sample_prompts_to_dir
from ranke.models.gpt import Transformer
from ranke.models.vq import VQModel
from ranke.runtime import UserError

ON_CPU = ("device=cpu",)


def _seeded(model_class, args, seed: int):
    torch.manual_seed(seed)
    return model_class(args)


@pytest.fixture(scope="module")
def posttrain_run(tmp_path_factory):
    """A post-training run written the way the recipe writes it: two checkpoints (steps 5 and 10),
    each with online and EMA policies and decoders, from the toy presets with random weights; the
    base tokenizer is an asset file named by posttrain.tokenizer."""
    root = tmp_path_factory.mktemp("posttrain")
    cfg = config_lib.load(RunConfig, "toy")
    base_path = root / "base_tokenizer.safetensors"
    base = _seeded(VQModel, cfg.vq, 0)
    save_asset(base_path, "vq", cfg.vq, base.state_dict(), dtype=torch.float32)
    cfg.posttrain.tokenizer = str(base_path)
    config_yaml = yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False)
    run = root / "run"
    states = {}
    for step, seed in ((5, 10), (10, 20)):
        states[step] = {
            "policy": _seeded(Transformer, cfg.gpt, seed).state_dict(),
            "policy_ema": _seeded(Transformer, cfg.gpt, seed + 1).state_dict(),
            "vq": _seeded(VQModel, cfg.vq, seed + 2).state_dict(),
            "vq_ema": _seeded(VQModel, cfg.vq, seed + 3).state_dict(),
            "discriminator": {"weight": torch.zeros(2)},
        }
        checkpoint_lib.save_checkpoint(run, step, states[step], {"step": step}, config_yaml)
    return run, states, base.state_dict()


def _assert_state_equal(module: torch.nn.Module, expected: dict) -> None:
    actual = module.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.mark.parametrize("policy", ["online", "ema"])
@pytest.mark.parametrize("decoder", ["online", "ema", "base"])
def test_run_dir_loads_the_latest_checkpoint_with_the_chosen_weights(posttrain_run, policy, decoder):
    run, states, base = posttrain_run
    backbone, cfg = load_backbone(ModelChoice(checkpoint=str(run), policy=policy, decoder=decoder, overrides=ON_CPU))
    newest = states[10]
    _assert_state_equal(backbone.policy, newest["policy" if policy == "online" else "policy_ema"])
    expected_decoder = {"online": newest["vq"], "ema": newest["vq_ema"], "base": base}[decoder]
    _assert_state_equal(backbone.tokenizer, expected_decoder)
    assert cfg.posttrain.tokenizer.endswith("base_tokenizer.safetensors")
    assert not backbone.policy.training and not backbone.tokenizer.training


def test_checkpoint_dir_loads_that_step(posttrain_run):
    run, states, _ = posttrain_run
    step_5 = str(run / "checkpoints" / "step_000005")
    backbone, _ = load_backbone(ModelChoice(checkpoint=step_5, policy="ema", decoder="ema", overrides=ON_CPU))
    _assert_state_equal(backbone.policy, states[5]["policy_ema"])
    _assert_state_equal(backbone.tokenizer, states[5]["vq_ema"])


def test_checkpoint_without_ema_names_what_it_has(posttrain_run, tmp_path):
    run, states, _ = posttrain_run
    _, _, config_yaml = checkpoint_lib.load_checkpoint(run / "checkpoints" / "step_000005")
    online_only = {"policy": states[5]["policy"], "vq": states[5]["vq"]}
    checkpoint_lib.save_checkpoint(tmp_path, 1, online_only, {"step": 1}, config_yaml)
    load_backbone(ModelChoice(checkpoint=str(tmp_path), overrides=ON_CPU))  # online weights are there
    with pytest.raises(UserError, match="no policy_ema weights .*it has: policy, vq"):
        load_backbone(ModelChoice(checkpoint=str(tmp_path), policy="ema", overrides=ON_CPU))



def test_a_checkpoint_config_is_checked_with_the_overrides_set(posttrain_run, tmp_path):
    """The checkpoint branch checks its config as the defaults branch does: a value out of its
    domain in config.yaml is one line, and an override that sets it right loads."""
    run, states, _ = posttrain_run
    _, _, config_yaml = checkpoint_lib.load_checkpoint(run / "checkpoints" / "step_000005")
    data = yaml.safe_load(config_yaml)
    data["sampling"]["top_p"] = 1.5
    checkpoint_lib.save_checkpoint(tmp_path, 1, states[5], {"step": 1}, yaml.safe_dump(data))
    with pytest.raises(UserError, match="config key 'sampling.top_p' is 1.5"):
        load_backbone(ModelChoice(checkpoint=str(tmp_path), overrides=ON_CPU))
    _, cfg = load_backbone(ModelChoice(checkpoint=str(tmp_path), overrides=(*ON_CPU, "sampling.top_p=0.9")))
    assert cfg.sampling.top_p == 0.9

def test_single_model_sources_have_no_ema(tmp_path):
    with pytest.raises(UserError, match="no EMA copies"):
        load_backbone(ModelChoice(policy="ema", overrides=ON_CPU))
    with pytest.raises(UserError, match="no EMA copies"):
        load_backbone(ModelChoice(decoder="ema", overrides=ON_CPU))
    with pytest.raises(UserError, match="--policy must be one of"):
        load_backbone(ModelChoice(policy="best", overrides=ON_CPU))
    with pytest.raises(UserError, match="is not a policy file, an SFT run"):
        load_backbone(ModelChoice(checkpoint=str(tmp_path), overrides=ON_CPU))


def test_sample_decodes_the_same_tokens_with_each_decoder(posttrain_run, tmp_path):
    """The decoder choice changes the pixels, never the sampled tokens: each folder holds one
    token draw (the online policy, seed 3) decoded by the chosen tokenizer."""
    run, _, _ = posttrain_run
    captions = ["a large red circle", "a small blue square"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(captions) + "\n")
    backbone, cfg = load_backbone(ModelChoice(checkpoint=str(run), overrides=ON_CPU))
    base, _ = load_backbone(ModelChoice(checkpoint=str(run), decoder="base", overrides=ON_CPU))
    emb, mask = backbone.encode_prompts(captions)
    tokens = backbone.sample(emb, mask, cfg.sampling, torch.Generator().manual_seed(batch_seed(3, 0))).tokens
    for decoder, tokenizer in (("online", backbone.tokenizer), ("base", base.tokenizer)):
        out = tmp_path / decoder
        choice = ModelChoice(checkpoint=str(run), decoder=decoder, overrides=ON_CPU)
        summary = sample_prompts_to_dir(out_dir=str(out), model=choice, prompts_file=str(prompts), seed=3)
        assert summary["decoder"] == decoder and summary["policy"] == "online" and summary["n"] == 2
        lines = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
        assert [line["caption"] for line in lines] == captions
        expected = (backbone.decode(tokens, decoder=tokenizer).permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
        written = torch.stack([torch.from_numpy(np.array(Image.open(out / line["file"]))) for line in lines])
        assert torch.equal(written, expected)
    assert not torch.equal(backbone.decode(tokens), backbone.decode(tokens, decoder=base.tokenizer))
