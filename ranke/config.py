"""Typed configuration: dataclasses are the single source of truth, YAML presets fill them,
and trailing `key=value` arguments override them.

Override keys are resolved the way users type them: a dotted key (`vq.codebook_size=512`)
is absolute; a bare key (`steps=2000`) is looked up first in the running recipe's section
(`tokenizer`, `sft`, ...) and then at the top level. Unknown keys are errors with a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ranke.choices import check_choices
from ranke.domains import validate
from ranke.models.gpt import GPT_PRESETS, GPTArgs
from ranke.models.lora import LoraArgs
from ranke.models.vq import VQ_PRESETS, VQArgs
from ranke.rewards.build import check_posttrain_rewards
from ranke.rewards.toy_clip import ToyCLIPArgs
from ranke.rewards.toy_features import ToyFeatureArgs
from ranke.runtime import UserError, read_user_text
from ranke.sampling import SamplingConfig
from ranke.toy.data import ToyConfig
from ranke.toy.text import ENCODING_VERSION


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, failing with a one-line message."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], where)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise UserError(f"config key '{where}' must be a mapping, got {value!r}")
        return build(annotation, value, prefix=where + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{where}' must be a list, got {value!r}")
        args = typing.get_args(annotation)
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{where}' must be true or false, got {value!r}")
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string; users write learning rates that way
            return float(value)
        except ValueError:
            pass
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, str):
        return value
    if annotation in (int, float, str):
        raise UserError(f"config key '{where}' must be {annotation.__name__}, got {value!r}")
    return value


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def build(cls, data: dict, prefix: str = ""):
    """Construct dataclass `cls` from a nested dict, rejecting unknown keys.

    A mapping given for a nested dataclass field is merged onto that field's default
    (e.g. `vq: {codebook_size: 512}` changes one field of the default toy VQ preset).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in fields:
            raise UserError(f"unknown config key '{prefix}{key}'{_suggest(key, list(fields))}")
        default = _field_default(fields[key])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            value = {**to_dict(default), **value}
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(obj) -> dict:
    """Plain nested dict of a config dataclass (tuples as lists, for YAML)."""

    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(obj))


def _resolve_key(cls, key: str, section: str | None) -> list[str]:
    """Map a user-typed override key to its path of field names."""
    parts = key.split(".")
    if len(parts) == 1 and section is not None:
        section_cls = typing.get_type_hints(cls)[section]
        if key in _field_names(section_cls):
            return [section, key]
    node = cls
    for i, part in enumerate(parts):
        names = _field_names(node) if dataclasses.is_dataclass(node) else []
        if part not in names:
            candidates = names + (
                _field_names(typing.get_type_hints(cls)[section]) if section and i == 0 else []
            )
            raise UserError(f"unknown config key '{key}'{_suggest(part, candidates)}")
        node = typing.get_type_hints(node)[part]
    return parts


# (path of field names, value) of each `key=value` override, as `parse_overrides` resolves them
ParsedOverrides = list[tuple[list[str], Any]]


def parse_overrides(cls, overrides: list[str], section: str | None = None) -> ParsedOverrides:
    """Each `key=value` override's path of field names in `cls` and its value parsed as YAML;
    a key `cls` does not have is an error with a suggestion."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        parsed.append((_resolve_key(cls, key.strip(), section), yaml.safe_load(raw)))
    return parsed


def set_overrides(data: dict, overrides: ParsedOverrides) -> dict:
    """A copy of the config mapping `data` with the parsed `overrides` set (a value replaces, a
    mapping as well: `posttrain.rewards={clip: 1}` is the whole reward table)."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}
    for path, value in overrides:
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return data


def apply_overrides(cls, data: dict, overrides: list[str], section: str | None = None) -> dict:
    """Return a copy of `data` with `key=value` overrides applied (values parsed as YAML)."""
    return set_overrides(data, parse_overrides(cls, overrides, section))


def build_checked(cls, data: dict):
    """`build`, then each number checked against its domain (`ranke.domains`), each choice
    against its values (`ranke.choices`) and a run's rewards by name (`ranke.rewards.build`: a
    user's `package.module:attribute` must import)."""
    cfg = build(cls, data)
    validate(cfg)
    check_choices(cfg)
    if isinstance(cfg, RunConfig):
        check_posttrain_rewards(cfg.posttrain, cfg.objects.rewards)
    return cfg


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' not found")
    try:
        data = yaml.safe_load(read_user_text(path, "config file"))
    except yaml.YAMLError as err:
        raise UserError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping at the top level")
    return data or {}


def load(cls, config, overrides: list[str] = (), section: str | None = None, objects: dict | None = None):
    """Config dataclass `cls` from `config` (a YAML file, a bundled preset name, None for the
    defaults, or a `cls` object, which is copied and checked again) plus `key=value` overrides,
    each number checked against its domain (`ranke.domains`) and each choice against its values
    (`ranke.choices`). `objects`: a `RunConfig`'s record of the objects the Python API was given
    (`ObjectsConfig` as a mapping), set after the overrides."""
    if isinstance(config, cls):
        data = to_dict(config)
    else:
        data = read_yaml(resolve_config_path(config)) if config is not None else {}
    data = apply_overrides(cls, data, list(overrides), section)
    if objects is not None:
        data["objects"] = objects
    return build_checked(cls, data)


def save(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# The run configuration: one dataclass per recipe section; model args from the model modules, the
# sampler's settings (SamplingConfig) from ranke.sampling.
# ---------------------------------------------------------------------------------------------
CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class TextConfig:
    """Frozen text encoder: `toy` (ranke.toy.text) or `t5` (a local flan-t5 directory)."""

    kind: str = "toy"
    path: str | None = None
    max_tokens: int = 4
    dim: int = 64
    # Version of the toy encoding a policy was trained with (policy assets carry it; only the
    # current one can be built, so an asset from before a change fails clearly instead of quietly).
    toy_encoding: int = ENCODING_VERSION
    # T5 only, defaults as LlamaGen's own T5 front end (the toy encoder ignores them):
    clean_captions: bool = True  # LlamaGen's web-caption cleaning (extra: ranke[captions]); false: lower-case + strip
    t5_dtype: str = "bf16"  # bf16 | fp32
    padding: str = "left"  # left: LlamaGen's training and samplers | right: the RankE release's post-training


@dataclass
class BackboneConfig:
    """The model that post-training, sampling and evaluation run on.

    toy: the committed toy assets (or `posttrain.policy` / `posttrain.tokenizer` asset files);
    llamagen: official LlamaGen files (`gpt_ckpt`, `vq_ckpt`) with a local flan-t5-xl directory
    (`t5_path`), the GPT preset and the image size (256 -> 16x16 tokens, 512 -> 32x32);
    janus: a local transformers Janus-Pro directory (`model_path`).
    """

    kind: str = "toy"
    gpt_ckpt: str | None = None
    vq_ckpt: str | None = None
    t5_path: str | None = None
    gpt_preset: str = "GPT-XL"
    vq_preset: str = "VQ-16"
    image_size: int = 256
    model_path: str | None = None
    trust_checkpoint: bool = False  # allow unpickling arbitrary objects in .pt files (trusted files only)


@dataclass
class TokenizerTrainConfig:
    """`ranke train-tokenizer`: VQGAN training (LlamaGen's vq_loss terms, toy-sized defaults)."""

    steps: int = 2400
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    recon_kind: str = "l2"
    recon_weight: float = 1.0
    # extra pixel-loss weight on object pixels and a margin (ranke.algo.vqgan.object_pixel_weight); off:
    # 4 made better reconstructions but a worse SFT policy (docs/benchmarks.md, "Toy recipes")
    object_weight: float = 0.0
    object_margin: int = 2  # pixels the object mask is grown by
    perceptual: str = "pyramid"
    perceptual_weight: float = 1.0  # LlamaGen's weight: object edges, not background, dominate this term
    vgg_path: str | None = None
    lpips_lin_path: str | None = None
    codebook_weight: float = 1.0
    restart_dead_codes_every: int = 100  # 0 disables; re-seeds codes unused in the recent window
    disc_weight: float = 0.5
    disc_start: int = 1800
    disc_lr: float = 1e-4
    disc_channels: int = 64
    disc_layers: int = 3
    eval_images: int = 500
    log_every: int = 10
    grid_every: int = 500
    save_every: int = 1000


@dataclass
class SFTConfig:
    """`ranke sft`: next-token training of the policy on (caption, tokenizer codes)."""

    # batch 64: far better samples than 32 for the same compute (docs/benchmarks.md, "Toy recipes")
    steps: int = 5000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    tokenizer: str | None = None  # asset file; None: the committed toy tokenizer
    eval_prompts: int = 16  # prompts shown in the sample grids
    eval_samples: int = 500  # held-out prompts scored by the verifier at the end
    log_every: int = 10
    grid_every: int = 1000
    save_every: int = 1000


@dataclass
class PosttrainConfig:
    """`ranke posttrain`: GRPO policy stage and RankE decoder stage (METHOD.md section 3).

    Defaults are the released LlamaGen values where they transfer to the toy world; the toy
    preset (configs/toy.yaml) changes the learning rates and sizes for a 2-core CPU.
    """

    # policy (frozen-decoder GRPO baseline) | decoder | both (RankE) | pixel (VA-π's pixel alignment
    # of the policy) | pixel_and_decoder (VA-π's policy stage, then RankE's decoder stage)
    mode: str = "both"
    steps: int = 200
    prompts_per_step: int = 8
    group_size: int = 8
    policy: str | None = None  # starting policy asset; None: the committed toy SFT policy
    tokenizer: str | None = None  # starting tokenizer asset; None: the committed toy tokenizer
    prompts: str | None = None  # toy-grammar prompt file (txt/jsonl/csv); None: the toy training stream
    data: str | None = None  # image-caption data (folder + captions.jsonl/csv, or .tar shards; see docs/data.md)
    micro_batch_size: int = 0  # rollouts per forward/backward in the policy stage; 0: all at once
    deterministic: bool = False  # deterministic kernels (exact resume on CPU)
    check_replicas_every: int = 0  # with several processes: every N steps, fail if their weights differ
    policy_sharding: str = "ddp"  # ddp (replicated policy) | fsdp (parameters, grads, AdamW states split over processes)
    policy_grad_checkpointing: bool = False  # recompute policy blocks in backward (memory for compute)
    # a LoRA adapter trains instead of the whole policy (ranke.models.lora; the `lora` extra):
    # enabled, rank, alpha, dropout, target_modules
    lora: LoraArgs = field(default_factory=LoraArgs)
    decoder_grad_checkpointing: bool = False  # the same for the decoder in the decoder stage
    rewards: dict[str, float] = field(default_factory=lambda: {"toy_clip": 1.0})  # name -> weight
    clip_path: str | None = None  # local CLIP directory for the `clip` reward (and `aesthetic`'s image tower)
    hpsv2_path: str | None = None  # local HPSv2 checkpoint for the `hpsv2` reward
    aesthetic_path: str | None = None  # LAION aesthetic predictor, sac+logos+ava1-l14-linearMSE.pth
    image_reward_path: str | None = None  # ImageReward.pt
    image_reward_tokenizer: str | None = None  # local bert-base-uncased tokenizer directory for ImageReward
    # per-reward switches, {reward name: value} (ranke.rewards.build.RewardSettings); the release:
    # every reward un-normalised, hpsv2 x100 without gradient
    reward_scale: dict[str, float] = field(default_factory=dict)  # default 1
    reward_normalize: dict[str, bool] = field(default_factory=dict)  # default true (running mean/std)
    reward_gradient: dict[str, bool] = field(default_factory=dict)  # default: the reward's own
    # keyword arguments of the user's reward classes, {package.module:attribute: {argument: value}}
    reward_args: dict[str, dict] = field(default_factory=dict)
    # policy stage (GRPO)
    policy_lr: float = 1e-5
    policy_weight_decay: float = 0.01
    grpo_epochs: int = 1
    loss_type: str = "grpo"  # grpo (released) | dr_grpo | dapo | gspo (ranke.algo.policy_losses; docs/posttrain.md)
    clip_eps: float = 0.2  # grpo, dr_grpo, dapo: the ratio's clip range [1 - clip_eps, 1 + clip_eps]
    clip_eps_high: float = 0.28  # dapo: the upper bound 1 + clip_eps_high (clip-higher)
    gspo_clip_eps: float = 3e-4  # gspo: the sequence ratio's range [1 - gspo_clip_eps, 1 + gspo_clip_eps_high]
    gspo_clip_eps_high: float = 4e-4
    # DAPO's dynamic sampling: groups whose rewards are all equal are dropped and refilled by up to
    # this many extra rollouts of new prompts per step; 0: off
    dynamic_sampling_draws: int = 0
    kl_coef: float = 0.05
    # the pixel modes (VA-π, docs/posttrain.md "What does mode=pixel do?"): teacher forcing on the real
    # images' codes, each context code replaced by a random one with probability pixel_context_noise;
    # reward -(pixel_weight * pixel_distance + pixel_perceptual_weight * `perceptual`) of the decoded
    # predictions against the real image; + likelihood_weight * the real codes' cross-entropy
    pixel_context_noise: float = 0.5
    pixel_distance: str = "l2"  # l2 (VA-π) | l1
    pixel_weight: float = 1.0
    pixel_perceptual_weight: float = 1.0
    likelihood_weight: float = 0.1
    kl_kind: str = "squared"  # squared (released) | k3
    reference: str = "frozen"  # frozen copy of the start | ema (the EMA policy, the fallback)
    policy_ema_decay: float = 0.999
    policy_ema_every: int = 10
    grad_clip: float = 1.0
    # decoder stage (RankE)
    decoder_lr: float = 5e-5
    disc_lr: float = 2e-5
    decoder_weight_decay: float = 0.01
    rank_top_k: int = 1
    tau_start: float = 4.0
    tau_end: float = 1.0
    tau_anneal_ratio: float = 0.15
    uniform_weights: bool = False  # the paper's ablation: plain GAN instead of rank-weighted
    uniform_advantages: bool = False  # the release's ablation: every rollout's GRPO advantage is 1
    disc_start: int = 100
    disc_channels: int = 64
    disc_layers: int = 3
    recon_weight: float = 1.0
    recon_kind: str = "l1"
    perceptual: str = "pyramid"  # lpips (needs local VGG/LPIPS files) | pyramid (toy)
    perceptual_weight: float = 1.0
    vgg_path: str | None = None
    lpips_lin_path: str | None = None
    rank_gan_weight: float = 1.0
    disc_weight: float = 0.5
    consistency_weight: float = 10.0  # lambda_c: constant (schedule none) or where the ramp ends
    consistency_schedule: str = "none"  # none | linear | cosine: ramp from start weight to lambda_c
    consistency_start_weight: float = 0.0  # the ramp's weight up to consistency_start_step
    consistency_start_step: int = 0
    consistency_end_step: int | None = None  # the ramp reaches lambda_c here; None: steps // 4
    reward_backprop_weight: float = 0.01
    soft_token_weight: float = 0.0  # off in the released runs
    soft_token_top_k: int = 20
    # current: the policy's logits after this step's policy stage | rollout: those the rollout was
    # scored with, before it (the release)
    soft_token_logits: str = "current"
    soft_token_codebook: str = "unit"  # unit: the codes as decoded (l2-normalised) | raw: the stored vectors (the release)
    # the release's decoder-stage details: decodes clamped to [-1, 1] before the rank-GAN, consistency
    # and reward terms; discriminator AdamW betas (0.9, 0.999), weight decay 0.01, loss x disc_weight (0.5)
    clamp_decodes: bool = False
    disc_betas: tuple[float, float] = (0.5, 0.9)  # LlamaGen's VQGAN recipe
    disc_weight_decay: float = 0.0
    disc_loss_weight: float = 1.0
    decoder_ema_decay: float = 0.99
    decoder_ema_every: int = 1
    # bookkeeping
    log_every: int = 1
    grid_every: int = 50
    grid_prompts: int = 16
    save_every: int = 50
    keep_checkpoints: int = 0  # keep only the newest N checkpoints; 0: keep all
    eval_every: int = 0  # 0: evaluate only at the end
    eval_samples: int = 500  # held-out prompts per evaluation; 0: no evaluation
    eval_seed: int = 0  # sampling seed of every evaluation, the same across runs and training seeds
    eval_split: str = "heldout"  # heldout (report) | validation (choosing settings: sweeps)

    @property
    def trains_policy(self) -> bool:
        """Whether the policy stage runs (every mode but decoder)."""
        return self.mode != "decoder"

    @property
    def trains_decoder(self) -> bool:
        """Whether the decoder stage runs (modes decoder, both and pixel_and_decoder): the decoder
        and a discriminator train."""
        return self.mode in ("decoder", "both", "pixel_and_decoder")

    @property
    def aligns_pixels(self) -> bool:
        """Whether the rollouts are VA-π's teacher-forced predictions of the real images' codes,
        scored by reconstruction (modes pixel and pixel_and_decoder), rather than free samples
        scored by `rewards`."""
        return self.mode in ("pixel", "pixel_and_decoder")

    @property
    def clip_range(self) -> tuple[float, float]:
        """The policy loss's (eps_low, eps_high): gspo's own small range, dapo's asymmetric one,
        else `clip_eps` on both sides."""
        if self.loss_type == "gspo":
            return self.gspo_clip_eps, self.gspo_clip_eps_high
        return self.clip_eps, self.clip_eps_high if self.loss_type == "dapo" else self.clip_eps

    @property
    def consistency_span(self) -> tuple[int, int]:
        """The steps over which a linear / cosine lambda_c ramps: `consistency_start_step` to
        `consistency_end_step`, which defaults to a quarter of `steps`."""
        end = self.steps // 4 if self.consistency_end_step is None else self.consistency_end_step
        return self.consistency_start_step, end


@dataclass
class ToyCLIPConfig:
    """Training of one toy CLIP. `seed_offset` is added to the run seed, so that the reward and
    the evaluation CLIP of one run start from different seeds."""

    model: ToyCLIPArgs = field(default_factory=ToyCLIPArgs)
    seed_offset: int = 0
    steps: int = 1000
    batch_size: int = 128
    hard_negatives: int = 2  # extra perturbed captions per pair on the text side
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    eval_prompts: int = 1000  # distinct held-out captions, scored in groups of eval_group
    eval_group: int = 100
    log_every: int = 10


@dataclass
class ToyFeatureConfig:
    """Training of the toy feature network (the Frechet distance "Inception")."""

    model: ToyFeatureArgs = field(default_factory=ToyFeatureArgs)
    seed_offset: int = 2
    steps: int = 1200
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    color_weight: float = 10.0  # the colour targets are in [0, 1]: their MSE is small
    eval_scenes: int = 1000
    fd_images: int = 1000  # per side; the two sides are disjoint halves of the reference set
    log_every: int = 10


@dataclass
class RewardTrainConfig:
    """`ranke train-reward`: the toy world's judges, each trained from its own seed offset.

    reward_clip is the training reward; eval_clip (another seed and width) reports "clip_score",
    so that a policy hacking the reward model's quirks shows as a gap between the two; features
    is the Frechet distance network. `models` picks which of the three to train.
    """

    models: list[str] = field(default_factory=lambda: ["reward_clip", "eval_clip", "features"])
    reward_clip: ToyCLIPConfig = field(default_factory=lambda: ToyCLIPConfig(model=ToyCLIPArgs(width=32)))
    eval_clip: ToyCLIPConfig = field(default_factory=lambda: ToyCLIPConfig(model=ToyCLIPArgs(width=24), seed_offset=1))
    features: ToyFeatureConfig = field(default_factory=ToyFeatureConfig)


@dataclass
class ObjectsConfig:
    """What a run was given as Python objects rather than named in its config (`ranke.api`), each
    described (what it was and where it came from): the Python API writes this section, and a
    resume must give the same objects again (`ranke.train.resume`). The command line gives none."""

    rewards: dict[str, str] = field(default_factory=dict)  # reward name in posttrain.rewards -> its module.qualname
    prompts: str | None = None  # the prompt list (its length and sha256) or prompt source (its class)
    backbone: str | None = None  # the backbone's class and parameter counts

    @property
    def given(self) -> bool:
        """Whether the run was given any object."""
        return bool(self.rewards) or self.prompts is not None or self.backbone is not None


@dataclass
class RunConfig:
    """Everything a run needs; presets under configs/ fill it, `key=value` overrides change it."""

    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16: bf16 autocast of forward passes where it is fast (ranke.precision)
    # where every recipe logs besides RUN/metrics.jsonl: tensorboard, wandb (the wandb extra), both
    # comma-separated, or none (ranke.train.logging.RunLogger)
    log_with: str = "tensorboard"
    # optimizer steps with a non-finite loss or gradient norm are skipped; this many in a row stop the run (0: never)
    max_consecutive_skips: int = 10
    # signals that make a recipe checkpoint after the current step and exit 75 (ranke.train.preemption); [] for none
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # seconds a collective may wait for the other processes before the run stops with one line (a dead or hung
    # process); longer than the longest work the main process does alone (a checkpoint write, an evaluation)
    collective_timeout: float = 1800.0
    toy: ToyConfig = field(default_factory=ToyConfig)
    vq: VQArgs = field(default_factory=lambda: VQ_PRESETS["toy"])
    gpt: GPTArgs = field(default_factory=lambda: GPT_PRESETS["toy"])
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    text: TextConfig = field(default_factory=TextConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tokenizer: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    posttrain: PosttrainConfig = field(default_factory=PosttrainConfig)
    reward: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    objects: ObjectsConfig = field(default_factory=ObjectsConfig)


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a bundled preset (`toy` -> ranke/configs/toy.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise UserError(f"config '{name_or_path}' not found (a YAML path, or one of: {', '.join(presets)})")
