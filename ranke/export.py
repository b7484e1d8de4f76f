"""`ranke export`: a post-trained policy and its co-evolved decoder in the formats other tools load.

    ranke export RUN_OR_CHECKPOINT --format llamagen --out DIR [--policy online|ema] [--decoder online|ema]
    ranke export RUN_OR_CHECKPOINT --format hf --out DIR ...

* `llamagen` (LlamaGen and toy runs): `gpt.pt` and `vq.pt`, each `{"model": state_dict}` with
  LlamaGen's parameter names, what LlamaGen's `autoregressive/sample/sample_t2i.py` loads with
  `--gpt-ckpt` / `--vq-ckpt` (`ranke check-checkpoint` checks the layout). Those scripts read
  `.pt` with `torch.load`, so the files are not safetensors. `vq.pt` is the whole VQ model with
  the chosen decoder: encoder, quantizer and codebook never train, so codes mean what they meant.
* `hf` (Janus runs): a `save_pretrained` directory of `JanusForConditionalGeneration` (safetensors)
  and its processor. The run's base model directory supplies the parts post-training leaves alone
  (understanding tower, text head); the chosen policy replaces the language model and generation
  modules, the chosen decoder the VQ model's.

A LoRA run's checkpoint holds the adapter alone: its adapter is merged into the run's starting
policy (`ranke.models.lora.merge_adapter`), so `gpt.pt` (or the Janus folder) holds whole weights
in the usual layout, and the adapter also goes to `adapter/` in PEFT's own format.

Both write a model card (README.md): source checkpoint, steps, the weights chosen, the last
evaluation the run logged, how to load the files, and the run's config. Weights are written as
trained (fp32 master copies). Files go to a temporary folder renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from ranke import checkpoint as checkpoint_lib
from ranke import config as config_lib
from ranke.backbones import load_configured_backbone
from ranke.checkpoint import DECODER_STEMS, POLICY_STEMS
from ranke.config import RunConfig
from ranke.models.lora import merge_adapter
from ranke.runtime import UserError

FORMATS = ("llamagen", "hf")
FORMAT_OF_BACKBONE = {"toy": "llamagen", "llamagen": "llamagen", "janus": "hf"}


def resolve_checkpoint(source: str | Path) -> Path:
    """A post-training checkpoint directory, or a run directory's newest intact checkpoint (a
    damaged newer one is passed over with a warning; none intact: the latest, which loading refuses)."""
    path = Path(source)
    if (path / checkpoint_lib.MANIFEST).is_file():
        return path
    latest = checkpoint_lib.newest_loadable_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise UserError(f"'{source}' is neither a post-training run nor a checkpoint directory (checkpoints/step_*)")
    return latest


def last_evaluation(checkpoint: Path) -> list[dict]:
    """The run's `eval.jsonl` records of its last evaluated step up to the checkpoint's step (one
    per decoder evaluated); empty when it logged none."""
    log = checkpoint.parent.parent / "eval.jsonl"
    step = checkpoint_lib.STEP_DIR.match(checkpoint.name)
    if not log.is_file() or step is None:
        return []
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    records = [record for record in records if record.get("step", 0) <= int(step.group(1))]
    return [record for record in records if record["step"] == records[-1]["step"]] if records else []


def _llamagen_files(out: Path, cfg: RunConfig, policy: dict, vq: dict) -> list[str]:
    torch.save({"model": policy}, out / "gpt.pt")
    torch.save({"model": vq}, out / "vq.pt")
    return ["gpt.pt", "vq.pt"]


def _llamagen_usage(cfg: RunConfig) -> str:
    if cfg.backbone.kind == "toy":
        return (
            "Toy-world models in LlamaGen's layout (GPT preset `toy`, VQ preset `toy`): check them with\n"
            "`ranke check-checkpoint --kind gpt --preset toy gpt.pt` (and `--kind vq ... vq.pt`); LlamaGen's\n"
            "own scripts have no toy preset.\n"
        )
    grid = cfg.backbone.image_size // cfg.vq.downsample_factor
    return (
        "LlamaGen's sampler (FoundationVision/LlamaGen):\n\n"
        "```\npython autoregressive/sample/sample_t2i.py --gpt-ckpt gpt.pt --vq-ckpt vq.pt "
        f"--gpt-model {cfg.backbone.gpt_preset} --image-size {cfg.backbone.image_size} --t5-path <flan-t5-xl>\n```\n\n"
        f"({grid}x{grid} tokens; `ranke check-checkpoint --kind gpt --preset {cfg.backbone.gpt_preset} gpt.pt` and\n"
        f"`--kind vq --preset {cfg.backbone.vq_preset} vq.pt` check the layout.)\n"
    )


def _hf_files(out: Path, cfg: RunConfig, policy: dict, vq: dict) -> list[str]:
    """The run's base Janus with the post-trained policy and decoder, saved by save_pretrained."""
    from transformers import JanusForConditionalGeneration, JanusProcessor

    from ranke.backbones.janus import _check_janus_directory
    from ranke.models.janus import JanusDecoder, JanusPolicy

    base = Path(cfg.backbone.model_path or "")
    _check_janus_directory(base)
    model = JanusForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    JanusPolicy(model).load_state_dict(policy)  # the policy's modules are the model's own
    JanusDecoder(model.model.vqmodel).load_state_dict(vq)
    model.save_pretrained(out, safe_serialization=True)
    JanusProcessor.from_pretrained(base).save_pretrained(out)
    return sorted(path.name for path in out.iterdir() if path.is_file())  # not the LoRA adapter folder: listed by the caller


def _hf_usage(cfg: RunConfig) -> str:
    return (
        "transformers:\n\n```python\nfrom transformers import JanusForConditionalGeneration, JanusProcessor\n"
        'model = JanusForConditionalGeneration.from_pretrained("<this folder>")\n'
        'processor = JanusProcessor.from_pretrained("<this folder>")\n```\n\n'
        "or `ranke sample --backbone janus --model-path <this folder> ...`. The understanding tower and text\n"
        f"head are those of the base model `{cfg.backbone.model_path}`.\n"
    )


def model_card(
    checkpoint: Path, cfg: RunConfig, config_text: str, step: int, fmt: str, policy: str, decoder: str, files
) -> str:
    """README.md of an export: what it is, where it came from, how to load it, the run's config."""
    evaluation = last_evaluation(checkpoint)
    kind = {"toy": "toy world", "llamagen": "LlamaGen", "janus": "Janus-Pro"}[cfg.backbone.kind]
    lines = [
        f"# RankE post-trained {kind} model",
        "",
        f"Exported by `ranke export --format {fmt}` from `{checkpoint}`: step {step} of a `mode={cfg.posttrain.mode}`",
        f"run (of {cfg.posttrain.steps} configured), policy weights `{policy}`, decoder `{decoder}`",
        f"(`{POLICY_STEMS[policy]}` / `{DECODER_STEMS[decoder]}` of the checkpoint). Rewards: "
        + ", ".join(f"{name} x {weight}" for name, weight in cfg.posttrain.rewards.items())
        + ".",
        "",
        "Files: " + ", ".join(f"`{name}`" for name in files) + ".",
        "",
        "## Last evaluation",
        "",
        "```json\n" + json.dumps(evaluation, indent=2) + "\n```" if evaluation else "The run logged no evaluation up to this step.",
        "",
        "## Loading",
        "",
        _llamagen_usage(cfg) if fmt == "llamagen" else _hf_usage(cfg),
        "## Run config",
        "",
        "```yaml\n" + config_text.rstrip() + "\n```",
        "",
    ]
    return "\n".join(lines)


def merged_policy(cfg: RunConfig, adapter: dict[str, torch.Tensor], adapter_folder: Path) -> dict[str, torch.Tensor]:
    """A LoRA run's whole policy weights: its starting policy (named by its config) with the
    checkpoint's `adapter` merged in, in fp32 as trained; the adapter also to `adapter_folder`."""
    backbone, _ = load_configured_backbone(cfg, "cpu")
    return merge_adapter(backbone.policy.float(), cfg.posttrain.lora, adapter, adapter_folder).state_dict()


def export_checkpoint(source: str | Path, fmt: str, out: str | Path, policy: str = "online", decoder: str = "online") -> dict:
    """Write the export (see the module docstring); returns a summary for the command line."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}' (one of: {', '.join(FORMATS)})")
    if policy not in POLICY_STEMS or decoder not in DECODER_STEMS:
        raise UserError(f"--policy must be one of {', '.join(POLICY_STEMS)} and --decoder one of {', '.join(DECODER_STEMS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"export folder '{out}' exists and is not empty; choose a new --out")
    checkpoint = resolve_checkpoint(source)
    tensors, trainer_state, config_text = checkpoint_lib.load_checkpoint(checkpoint)
    cfg = config_lib.build(RunConfig, yaml.safe_load(config_text) or {})
    expected = FORMAT_OF_BACKBONE[cfg.backbone.kind]
    if fmt != expected:
        raise UserError(f"a {cfg.backbone.kind} run exports as --format {expected}, not {fmt}")
    missing = [stem for stem in (POLICY_STEMS[policy], DECODER_STEMS[decoder]) if stem not in tensors]
    if missing:
        raise UserError(f"checkpoint '{checkpoint}' has no {', '.join(missing)} weights (it has: {', '.join(tensors)})")

    temporary = out.parent / f".{out.name}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    write = _llamagen_files if fmt == "llamagen" else _hf_files
    policy_weights, adapter_files = tensors[POLICY_STEMS[policy]], []
    if cfg.posttrain.lora.enabled:
        policy_weights, adapter_files = merged_policy(cfg, policy_weights, temporary / "adapter"), ["adapter/"]
    files = [*write(temporary, cfg, policy_weights, tensors[DECODER_STEMS[decoder]]), *adapter_files]
    step = int(trainer_state["step"])
    card = model_card(checkpoint, cfg, config_text, step, fmt, policy, decoder, [*files, "README.md"])
    (temporary / "README.md").write_text(card)
    if out.exists():
        out.rmdir()
    temporary.rename(out)
    return {"out": str(out), "format": fmt, "checkpoint": str(checkpoint), "step": step, "files": [*files, "README.md"]}
