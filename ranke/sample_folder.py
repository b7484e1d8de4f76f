"""`ranke sample`: prompts in, a folder of PNGs plus captions.jsonl out (the layout
`ranke toy verify` and `ranke fid` read)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from PIL import Image

from ranke import checkpoint as checkpoint_lib
from ranke import config as config_lib
from ranke.assets import asset_path
from ranke.backbones import Backbone, load_configured_backbone
from ranke.config import RunConfig
from ranke.data import read_prompts
from ranke.models.lora import restore_policy
from ranke.runlock import claim_output_dir
from ranke.runtime import UserError, progress, select_device
from ranke.sampling import SamplingConfig
from ranke.toy.tools import CAPTIONS_FILE

POLICY_CHOICES = ("online", "ema")
DECODER_CHOICES = ("online", "ema", "base")
POLICY_STEMS = checkpoint_lib.POLICY_STEMS
# the base decoder is the tokenizer asset the run started from, not a checkpoint file
DECODER_STEMS = {**checkpoint_lib.DECODER_STEMS, "base": None}


@dataclass(frozen=True, kw_only=True)  # by name only: a swapped policy and decoder cannot pass unnoticed
class ModelChoice:
    """Which model a sampling or evaluation command runs: `checkpoint` (any source `load_backbone`
    takes; None: the committed toy assets), the `policy` (online | ema) and `decoder`
    (online | ema | base) weights of a post-training checkpoint, and `key=value` config `overrides`."""

    checkpoint: str | None = None
    policy: str = "online"
    decoder: str = "online"
    overrides: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "overrides", tuple(self.overrides))  # a list given is kept unchangeable
        if self.policy not in POLICY_CHOICES or self.decoder not in DECODER_CHOICES:
            raise UserError(f"--policy must be one of {POLICY_CHOICES} and --decoder one of {DECODER_CHOICES}")

    def resolved(self) -> ModelChoice:
        """This choice with a post-training run directory replaced by the checkpoint it loads
        (`posttrain_checkpoint`), so that loading and `model_source` name the same one."""
        checkpoint = posttrain_checkpoint(None if self.checkpoint is None else Path(self.checkpoint))
        return self if checkpoint is None else dataclasses.replace(self, checkpoint=str(checkpoint))

    def requested_device(self) -> str:
        """The `device` the overrides set (default `auto`), where the protocols' scorers run too."""
        return config_lib.load(RunConfig, None, self.overrides).device


def _checkpoint_backbone(
    directory: Path, device: torch.device, choice: ModelChoice, overrides: config_lib.ParsedOverrides
) -> tuple[Backbone, RunConfig]:
    """The backbone of one post-training checkpoint directory (ranke.checkpoint layout).

    Its config.yaml, with `overrides` set, names the starting models (`backbone`, and for the
    toy world the `posttrain.policy` / `posttrain.tokenizer` assets): they are built, and the
    chosen policy and decoder weights of the checkpoint replace theirs (`base` keeps the starting
    decoder; a LoRA run's adapter is merged into the starting policy).
    """
    tensors, _, config_text = checkpoint_lib.load_checkpoint(directory)
    cfg = config_lib.build_checked(RunConfig, config_lib.set_overrides(yaml.safe_load(config_text) or {}, overrides))
    policy_stem, decoder_stem = POLICY_STEMS[choice.policy], DECODER_STEMS[choice.decoder]
    missing = [stem for stem in (policy_stem, decoder_stem) if stem and stem not in tensors]
    if missing:
        raise UserError(
            f"checkpoint '{directory}' has no {', '.join(missing)} weights (it has: {', '.join(tensors)}); "
            f"choose another --policy/--decoder"
        )
    backbone, cfg = load_configured_backbone(cfg, device)
    backbone.policy = restore_policy(backbone.policy, cfg.posttrain.lora, tensors[policy_stem])
    if decoder_stem:
        backbone.tokenizer.load_state_dict(tensors[decoder_stem])
    return backbone, cfg


def load_backbone(choice: ModelChoice) -> tuple[Backbone, RunConfig]:
    """The backbone to sample from, and its config.

    `choice.checkpoint`: None (the committed toy policy and tokenizer), a policy asset file, an
    SFT run directory (`toy_policy.safetensors` and the tokenizer its config names), a
    post-training checkpoint directory (`checkpoints/step_NNNNNN`), or a post-training run
    directory (its latest checkpoint). `choice.policy` (online | ema) and `choice.decoder`
    (online | ema | base) pick the weights of a post-training checkpoint; the other sources hold
    one policy and one tokenizer, which count as "online" and as "base" alike.

    `choice.overrides` are `key=value` config overrides, as the recipes take them, parsed once and
    applied to the checkpoint's config.yaml (or to the defaults), the result checked either way:
    `sampling.*` changes the sampling settings, `device` the device (the checkpoint's own `device`
    is where it trained, so it is not used), `backbone.kind=llamagen|janus` with its `backbone.*`
    files loads a real model (without a checkpoint).
    """
    overrides = config_lib.parse_overrides(RunConfig, list(choice.overrides))
    requested = config_lib.build_checked(RunConfig, config_lib.set_overrides({}, overrides))
    device = select_device(requested.device)
    if requested.backbone.kind != "toy":
        if choice.checkpoint is not None:
            raise UserError("pass either --ckpt (a post-training run, which names its backbone) or --backbone, not both")
        return load_configured_backbone(requested, device)
    path = None if choice.checkpoint is None else Path(choice.checkpoint)
    checkpoint = posttrain_checkpoint(path)
    if checkpoint is not None:
        return _checkpoint_backbone(checkpoint, device, choice, overrides)
    if choice.policy != "online" or choice.decoder == "ema":
        raise UserError(
            f"'{choice.checkpoint or 'the committed toy assets'}' holds one policy and one tokenizer, no EMA copies; "
            f"--policy ema / --decoder ema need a post-training checkpoint"
        )
    if path is None:
        return load_configured_backbone(requested, device)
    if path.is_file():
        assets = {"policy": str(path)}
    elif (path / "toy_policy.safetensors").is_file():
        assets = {"policy": str(path / "toy_policy.safetensors")}
        if (path / "config.yaml").is_file():
            assets["tokenizer"] = config_lib.load(RunConfig, str(path / "config.yaml")).sft.tokenizer
    else:
        raise UserError(
            f"'{choice.checkpoint}' is not a policy file, an SFT run directory (toy_policy.safetensors) or a "
            f"post-training run or checkpoint directory (checkpoints/step_*/ with vq.safetensors)"
        )
    sources = dataclasses.replace(requested.posttrain, **assets)
    return load_configured_backbone(dataclasses.replace(requested, posttrain=sources), device)


def posttrain_checkpoint(path: Path | None) -> Path | None:
    """The post-training checkpoint directory `path` names: itself (a checkpoints/step_* directory),
    or for a run directory its newest intact checkpoint (a damaged newer one is passed over with a
    warning); None when `path` is not a post-training run or checkpoint."""
    if path is None or not path.is_dir():
        return None
    if (path / checkpoint_lib.MANIFEST).is_file():
        return path if (path / f"{DECODER_STEMS['online']}.safetensors").is_file() else None
    latest = checkpoint_lib.latest_checkpoint(path)
    if latest is None or not (latest / f"{DECODER_STEMS['online']}.safetensors").is_file():
        return None  # no checkpoints, or an SFT run's (policy only)
    return checkpoint_lib.newest_loadable_checkpoint(path)


def model_source(choice: ModelChoice, cfg: RunConfig) -> dict:
    """What `load_backbone(choice)` loaded (`cfg`: the config it returned), identified by content:
    the sha256 of a post-training checkpoint's manifest (which holds every file's sha256) or of
    the policy and tokenizer assets; a real backbone's files by size and modification time
    (hashing many GB at every `ranke sample` would dominate a short run)."""
    record: dict = {"ckpt": choice.checkpoint, "policy": choice.policy, "decoder": choice.decoder}
    if cfg.backbone.kind != "toy":
        files = [Path(f) for f in (cfg.backbone.gpt_ckpt, cfg.backbone.vq_ckpt, cfg.backbone.model_path) if f]
        stats = {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()}
        return {**record, "backbone": dataclasses.asdict(cfg.backbone), "files": stats}
    checkpoint = posttrain_checkpoint(None if choice.checkpoint is None else Path(choice.checkpoint))
    if checkpoint is not None:
        files = [checkpoint / checkpoint_lib.MANIFEST]
    else:  # the starting models load_backbone put into the config
        files = [cfg.posttrain.policy or asset_path("policy"), cfg.posttrain.tokenizer or asset_path("tokenizer")]
    return {**record, "files": {str(f): checkpoint_lib.file_sha256(f) for f in files if Path(f).is_file()}}


def batch_seed(seed: int, batch_index: int) -> int:
    """The sampling seed of one batch: batches draw independently, so a resumed or split run
    samples each batch exactly as an uninterrupted single-process run does."""
    return seed * 1_000_003 + batch_index


def process_rows(start: int, end: int, state) -> tuple[int, int]:
    """This process's contiguous share [first, last) of the batch [start, end) (accelerate `state`)."""
    share = end - start
    first = start + share * state.process_index // state.num_processes
    return first, start + share * (state.process_index + 1) // state.num_processes


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def _save_png_atomically(pixels, path: Path) -> None:
    """Write under a temporary name, then rename: a crash never leaves a truncated image behind."""
    temporary = path.with_name(path.name + ".tmp")
    Image.fromarray(pixels).save(temporary, format="PNG")
    os.replace(temporary, path)


PROVENANCE_FILE = "sampling.json"
SAMPLE_FILE = re.compile(r"^\d{5,}\.png(\.tmp)?$")


def folder_provenance(source: dict, sampling, prompts: list[str], seed: int, batch_size: int) -> dict:
    """What a sample folder's images depend on: the model (`model_source`), the sampling
    settings, the prompts (their sha256), the seed and the batch size (each batch has its own seed)."""
    digest = hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()
    return {
        "source": source, "sampling": dataclasses.asdict(sampling), "seed": seed, "batch_size": batch_size,
        "n": len(prompts), "prompts_sha256": digest,
    }  # fmt: skip


def _differences(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    names = []
    for key in sorted(set(saved) | set(wanted)):
        before, now = saved.get(key), wanted.get(key)
        if isinstance(before, dict) and isinstance(now, dict):
            names += _differences(before, now, f"{prefix}{key}.")
        elif before != now:
            names.append(f"{prefix}{key}")
    return names


def _sample_files(out: Path, names: list[str]) -> list[Path]:
    """The files of `out` a sampling run writes or that an earlier one left: NNNNN.png at the top,
    this run's `names` and those the earlier run listed in captions.jsonl (GenEval nests them),
    captions.jsonl itself."""
    top = [p for p in out.iterdir() if SAMPLE_FILE.match(p.name) or p.name == CAPTIONS_FILE]
    listing = out / CAPTIONS_FILE
    listed = []
    if listing.is_file():
        for line in listing.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                listed.append(str(json.loads(line)["file"]))
            except (ValueError, KeyError, TypeError):
                continue  # a damaged listing: its files are still found by name
    nested = {out / name for name in [*names, *listed] if "/" in name and ".." not in Path(name).parts}
    return top + sorted(path for path in nested if path.is_file())


def check_sample_folder(out: Path, provenance: dict, overwrite: bool, names: list[str] = ()) -> bool:
    """Whether `out` may be (re)filled with these samples: empty, or made by the same provenance
    (a resume). Images of other settings, or of unknown origin, are refused with one line
    unless `overwrite`; returns True when the folder's old samples must be removed first."""
    if not out.is_dir():
        return False
    listed = out / PROVENANCE_FILE
    holds_samples = bool(_sample_files(out, list(names)))
    if overwrite:
        return holds_samples or listed.exists()
    if listed.is_file():
        try:
            saved = json.loads(listed.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            saved = {}
        changed = _differences(saved, json.loads(json.dumps(provenance)))
        if changed:
            raise UserError(
                f"'{out}' holds samples made with other settings ({', '.join(changed[:3])} differ); "
                "pass --overwrite to replace them, or choose another --out"
            )
    elif holds_samples:
        raise UserError(
            f"'{out}' already holds images of unknown origin (no {PROVENANCE_FILE}); "
            "pass --overwrite to replace them, or choose another --out"
        )
    return False


def _remove_samples(out: Path, names: list[str]) -> None:
    for path in [*_sample_files(out, names), out / PROVENANCE_FILE]:
        path.unlink(missing_ok=True)


def sample_into_dir(
    backbone: Backbone, sampling: SamplingConfig, prompts: list[str], out_dir: str | Path, *, seed: int,
    batch_size: int, names: list[str] | None = None, source: dict | None = None, overwrite: bool = False,
) -> int:
    """One image per prompt into `out_dir` (NNNNN.png, or the relative paths `names`, then
    captions.jsonl); returns the number of processes.

    Resumable and splittable: batch k draws from its own generator (`batch_seed`), batches whose
    images all exist are skipped, and images are written atomically. The folder records what
    produced it (`sampling.json`: `source` from `model_source`, settings, prompts, seed) and is
    resumed only by the same; anything else is refused unless `overwrite` (`check_sample_folder`).
    Under `torchrun` / `accelerate launch` each process samples a contiguous share of every batch
    with that batch's random draws for its rows (`row_offset`), so the folder holds the same
    images, under the same names, whatever the number of processes.
    """
    from accelerate import PartialState

    state = PartialState(cpu=backbone.device.type == "cpu")
    out = Path(out_dir)
    names = names or [image_name(i) for i in range(len(prompts))]
    provenance = folder_provenance(source or {}, sampling, prompts, seed, batch_size)
    stale = check_sample_folder(out, provenance, overwrite, names)
    state.wait_for_everyone()  # every process has checked before the main one changes the folder
    if state.is_main_process:
        claim_output_dir(out)
        if stale:
            _remove_samples(out, names)
        (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    state.wait_for_everyone()
    starts = range(0, len(prompts), batch_size)
    todo = [s for s in starts if not all((out / names[i]).is_file() for i in range(s, min(s + batch_size, len(prompts))))]
    bar = progress(total=len(prompts), initial=len(prompts) - sum(min(batch_size, len(prompts) - s) for s in todo),
                   desc="sampling", disable_on_workers=not state.is_main_process)  # fmt: skip
    with torch.no_grad():
        for start in todo:
            end = min(start + batch_size, len(prompts))
            share = end - start
            first, last = process_rows(start, end, state)
            if last > first:
                generator = torch.Generator(backbone.device).manual_seed(batch_seed(seed, start // batch_size))
                text_emb, text_mask = backbone.encode_prompts(prompts[first:last])
                tokens = backbone.sample(
                    text_emb, text_mask, sampling, generator, row_offset=first - start, total_rows=share
                ).tokens
                pixels = (backbone.decode(tokens).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
                for index, image in zip(range(first, last), pixels):
                    (out / names[index]).parent.mkdir(parents=True, exist_ok=True)
                    _save_png_atomically(image, out / names[index])
            bar.update(share)
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        lines = [json.dumps({"file": name, "caption": prompt}) for name, prompt in zip(names, prompts)]
        (out / CAPTIONS_FILE).write_text("\n".join(lines) + "\n")
    return state.num_processes


def sample_prompts_to_dir(
    *,
    out_dir: str,
    model: ModelChoice = ModelChoice(),
    prompts_file: str | None = None,
    prompts: list[str] | None = None,
    seed: int = 0,
    n_per_prompt: int = 1,
    batch_size: int = 64,
    overwrite: bool = False,
) -> dict:
    """`ranke sample`: `n_per_prompt` images per prompt of `prompts_file` (or `prompts`) from the
    chosen `model` (`load_backbone`) into `out_dir`, resumable and split across processes
    (`sample_into_dir`)."""
    if n_per_prompt < 1 or batch_size < 1:
        raise UserError("--n-per-prompt and --batch-size must be positive")
    prompts = [p for p in (prompts if prompts is not None else read_prompts(prompts_file)) for _ in range(n_per_prompt)]
    if not prompts:
        raise UserError("no prompts to sample")
    model = model.resolved()
    backbone, cfg = load_backbone(model)
    processes = sample_into_dir(
        backbone, cfg.sampling, prompts, out_dir, seed=seed, batch_size=batch_size, source=model_source(model, cfg),
        overwrite=overwrite,
    )  # fmt: skip
    return {
        "n": len(prompts),
        "out": str(out_dir),
        "cfg_scale": cfg.sampling.cfg_scale,
        "seed": seed,
        "policy": model.policy,
        "decoder": model.decoder,
        "processes": processes,
    }
