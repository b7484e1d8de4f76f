"""LoRA adapters on the policy (`posttrain.lora`, ranke.models.lora): the reference policy is the
base with the adapter switched off, only the adapter trains and is checkpointed, the export merges
it into LlamaGen's layout. Exact resume and the non-finite guard with LoRA are cases of the
general tests (test_posttrain.py, test_faults.py); two processes with FSDP: test_distributed.py."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from ranke.backbones import load_configured_backbone
from ranke.cli import main
from ranke.config import RunConfig
from ranke.models.gpt import GPT_PRESETS, Transformer
from ranke.models.lora import LoraArgs, adapter_dropout, add_adapter, load_adapter
from ranke.sample_folder import ModelChoice, load_backbone
from ranke.sampling import token_logprobs
from ranke.train.posttrain import collect_rollout, next_prompts, start_posttrain, train_posttrain
from test_posttrain import LORA, TINY

PROMPTS = ["a picture of a large red triangle", "a small yellow circle"]


def base_policy() -> torch.nn.Module:
    """The committed toy SFT policy, the runs' starting point, in fp32 as the recipe holds it."""
    backbone, _ = load_configured_backbone(RunConfig(), "cpu")
    return backbone.policy.float()


def moved_adapter(adapted: torch.nn.Module, seed: int = 0) -> None:
    """Give every B a non-zero value, so that the adapter changes the policy."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("lora_run")
    train_posttrain("toy", str(out), [*TINY, *LORA, "mode=both", "steps=2", "save_every=1", "grid_every=100",
                                      "disc_start=0", "policy_lr=1e-3", "policy_ema_every=1"])  # fmt: skip
    return out


def test_reference_log_probs_are_the_base_policy_s_with_the_adapter_off(tmp_path, one_thread):
    run, _ = start_posttrain("toy", str(tmp_path), [*TINY, *LORA, "mode=policy"], resume=False)
    models = run.models
    assert models.reference is None and models.policy_ema.module is None  # no second copy of the base
    moved_adapter(models.policy)
    prompts, _ = next_prompts(run)
    rollout = collect_rollout(run, prompts, {})
    base = token_logprobs(base_policy(), rollout.text_emb, rollout.text_mask, rollout.tokens)
    adapted = token_logprobs(models.policy, rollout.text_emb, rollout.text_mask, rollout.tokens)
    assert torch.equal(rollout.logp_ref, base)
    assert (rollout.logp_old - base).abs().max() > 1e-3  # the adapter is on while sampling
    torch.testing.assert_close(rollout.logp_old, adapted, atol=1e-4, rtol=0)  # sampler's log-probs = teacher forcing


def test_only_the_adapter_trains_and_is_checkpointed(lora_run):
    steps = [lora_run / "checkpoints" / f"step_{step:06d}" for step in (1, 2)]
    adapter = [load_file(step / "policy.safetensors") for step in steps]
    adapter_ema = load_file(steps[1] / "policy_ema.safetensors")
    adapted = add_adapter(base_policy(), LoraArgs(enabled=True, rank=4, alpha=8))
    names = {name for name, parameter in adapted.named_parameters() if parameter.requires_grad}
    assert set(adapter[1]) == set(adapter_ema) == names and all(".lora_" in name for name in names)
    # rank 4 on each of 6 blocks: wqkv 192 -> 576, wo 192 -> 192, w1 and w3 192 -> 512, w2 512 -> 192
    assert sum(tensor.numel() for tensor in adapter[1].values()) == 6 * 4 * ((192 + 576) + (192 + 192) + 3 * (192 + 512))
    moments = torch.load(steps[1] / "trainer_state.pt", weights_only=True)["optimizers"]["policy"]["state"]
    shapes = sorted(tuple(state["exp_avg"].shape) for state in moments.values())
    assert shapes == sorted(tuple(tensor.shape) for tensor in adapter[1].values())  # AdamW moments of the adapter alone
    decay = 0.999  # the EMA of B from B = 0, updated after both steps: decay * (1 - decay) * B_1 + (1 - decay) * B_2
    for name in (name for name in names if "lora_B" in name):
        assert adapter[1][name].abs().max() > 0
        expected = decay * (1 - decay) * adapter[0][name] + (1 - decay) * adapter[1][name]
        torch.testing.assert_close(adapter_ema[name], expected, atol=1e-9, rtol=1e-5)


def test_export_merges_the_adapter_into_llamagen_s_layout(lora_run, tmp_path, capsys):
    out = tmp_path / "export"
    main(["export", str(lora_run), "--format", "llamagen", "--out", str(out)])
    summary = json.loads(capsys.readouterr().out)
    assert sorted(summary["files"]) == ["README.md", "adapter/", "gpt.pt", "vq.pt"]
    main(["check-checkpoint", "--kind", "gpt", "--preset", "toy", str(out / "gpt.pt")])
    assert capsys.readouterr().out.startswith("ok ")

    merged = Transformer(GPT_PRESETS["toy"]).eval()
    merged.load_state_dict(torch.load(out / "gpt.pt", map_location="cpu", weights_only=True)["model"])  # strict
    adapted = add_adapter(base_policy(), LoraArgs(enabled=True, rank=4, alpha=8))
    load_adapter(adapted, load_file(lora_run / "checkpoints" / "step_000002" / "policy.safetensors"))
    backbone, _ = load_backbone(ModelChoice(checkpoint=str(lora_run), overrides=("device=cpu",)))
    text, mask = backbone.encode_prompts(PROMPTS)
    tokens = torch.randint(256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapted(text, tokens, mask)
        torch.testing.assert_close(merged(text, tokens, mask), expected, atol=1e-5, rtol=1e-5)
        assert (expected - base_policy()(text, tokens, mask)).abs().max() > 1e-3  # the adapter moved the policy
        assert torch.equal(backbone.policy(text, tokens, mask), merged(text, tokens, mask))  # `ranke sample` merges alike

        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(base_policy(), out / "adapter")
        assert torch.equal(reloaded(text, tokens, mask), expected)


def test_adapter_dropout_acts_only_in_the_training_forward(one_thread):
    adapted = add_adapter(base_policy(), LoraArgs(enabled=True, rank=4, dropout=0.5))
    moved_adapter(adapted)
    text = torch.randn(2, 4, 64)
    tokens = torch.randint(256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first, second = adapted(text, tokens), adapted(text, tokens)
        with adapter_dropout(adapted):
            dropped = adapted(text, tokens)
        after = adapted(text, tokens)
    assert torch.equal(first, second) and torch.equal(first, after)
    assert (dropped - first).abs().max() > 1e-4


def test_lora_without_peft_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` sees when it is not installed
    with pytest.raises(SystemExit) as exit_info:
        main(["posttrain", "--out", str(tmp_path / "run"), *LORA])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs PEFT, which is not installed: pip install 'ranke[lora]'" in err
    assert not (tmp_path / "run" / "config.yaml").exists()
