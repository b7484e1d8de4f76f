"""Recipe: supervised (next-token) training of the AR policy on the toy world.

    ranke sft --config configs/toy.yaml --out runs/sft precision=bf16 [key=value ...]

Per step: a fresh batch of (image, caption) pairs from the seeded toy stream; the frozen
tokenizer turns images into code sequences and the frozen text encoder turns captions into
embeddings (`next_batch`); the policy is trained with cross-entropy on every image token, with
caption dropout (replacing a caption by the unconditional embedding) so classifier-free guidance
works at sampling time (`policy_step`). With `precision=bf16` the policy's forward pass runs under
bf16 autocast (faster steps on a CPU with avx512_bf16; the toy policy is compute-limited, so the
committed one was trained this way); codes and the loss stay fp32. The result is written as
`RUN/toy_policy.safetensors`, the format of the committed asset, and evaluated with the verifier
on held-out prompts.

Set-up, resume, stop signals and checkpoints are every recipe's (`ranke.train.run`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ranke.assets import save_asset
from ranke.backbones.base import Backbone, build_text_encoder, check_compatible
from ranke.backbones.toy import load_tokenizer
from ranke.config import RunConfig, SFTConfig
from ranke.images import save_image_grid
from ranke.models.gpt import Transformer
from ranke.models.vq import to_model_range
from ranke.parallel import Shard
from ranke.runtime import autocast
from ranke.toy.data import heldout_prompts, train_batch
from ranke.toy.verifier import score_image, summarize
from ranke.train.guard import StepGuard
from ranke.train.logging import RunLogger
from ranke.train.run import RunStart, begin_run, due, log_record, save_recipe_checkpoint, train_recipe, write_run_config
from ranke.train.schedule import warmup_cosine
from ranke.train.trainer_state import GuardedOptimizer, restore_trainer_state, trainer_state, upgrade


@torch.no_grad()
def sample_images(backbone: Backbone, prompts: list[str], cfg: RunConfig, seed: int, batch_size: int = 64):
    """Images [N,3,H,W] in [0,1] for `prompts`, one per prompt, reproducible from `seed`."""
    generator = torch.Generator(backbone.device).manual_seed(seed)
    return torch.cat([images for _, images in backbone.generate_images(prompts, cfg.sampling, generator, batch_size)])


def verifier_accuracy(images: torch.Tensor, prompts: list[str]) -> dict:
    return summarize([score_image(image, prompt) for image, prompt in zip(images, prompts)])


@dataclass
class SFTRun:
    """An SFT run as its stages see it (built once by `start_sft`)."""

    start: RunStart
    shard: Shard  # this process's share of every batch
    backbone: Backbone  # the frozen text encoder and tokenizer around the trained policy
    policy_for_loss: torch.nn.Module  # the policy, DDP-wrapped with several processes
    optimizer: GuardedOptimizer  # AdamW on a warm-up + cosine schedule
    data_rng: np.random.Generator  # the toy stream, checkpointed
    preview_prompts: list[str]

    @property
    def scfg(self) -> SFTConfig:
        return self.start.cfg.sft


@dataclass
class SFTBatch:
    codes: torch.Tensor  # [b, N] the tokenizer's codes of this process's images
    text_emb: torch.Tensor
    text_mask: torch.Tensor
    dropped: torch.Tensor  # [b] captions replaced by the unconditional embedding


def policy_optimizer(policy: torch.nn.Module, scfg: SFTConfig, guard: StepGuard) -> GuardedOptimizer:
    """AdamW with weight decay on matrices only, on a warm-up + cosine schedule."""
    decay = [p for p in policy.parameters() if p.dim() >= 2]
    no_decay = [p for p in policy.parameters() if p.dim() < 2]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": scfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=scfg.lr,
        betas=tuple(scfg.betas),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        adamw, lambda step: warmup_cosine(step, scfg.warmup_steps, scfg.steps, scfg.min_lr_ratio)
    )
    return GuardedOptimizer(optimizer=adamw, module=policy, guard=guard, lr=scfg.lr, schedule=schedule)


def start_sft(config: str | RunConfig, out_dir: str, overrides: list[str], resume: bool) -> tuple[SFTRun, int]:
    """Set the run up (`ranke.train.run.begin_run`), build the policy on the frozen tokenizer and
    text encoder, restore a checkpoint with `resume`; returns the run and the step to start from."""
    start = begin_run(config, out_dir, overrides, "sft", resume)
    cfg, device = start.cfg, start.device
    shard = Shard.of(start.accelerator, cfg.sft.batch_size, "sft.batch_size")
    tokenizer = load_tokenizer(cfg.sft.tokenizer, device).requires_grad_(False)
    check_compatible(cfg.gpt, tokenizer.args, cfg.text, cfg.toy.image_size)
    if start.main_process:
        write_run_config(cfg, start.run_dir)
    policy = Transformer(cfg.gpt).to(device)
    run = SFTRun(
        start=start, shard=shard, policy_for_loss=start.accelerator.prepare(policy),
        backbone=Backbone(build_text_encoder(cfg.text, device), policy, tokenizer),
        optimizer=policy_optimizer(policy, cfg.sft, StepGuard("policy", cfg.max_consecutive_skips, device)),
        data_rng=np.random.default_rng(cfg.seed), preview_prompts=heldout_prompts(cfg.toy)[: cfg.sft.eval_prompts],
    )  # fmt: skip
    if start.resumed is None:
        return run, 0
    tensors, saved = start.resumed[0], upgrade(start.resumed[1], "sft")
    policy.load_state_dict(tensors["policy"])
    restore_trainer_state(saved, {"policy": run.optimizer}, {"data": run.data_rng})
    return run, saved["step"]


def next_batch(run: SFTRun) -> SFTBatch:
    """Every process draws the whole batch (and its caption dropout) and keeps its share."""
    cfg, shard, device = run.start.cfg, run.shard, run.start.device
    images, captions, _ = train_batch(run.data_rng, run.scfg.batch_size, cfg.toy)
    dropped = torch.rand(run.scfg.batch_size) < cfg.gpt.class_dropout_prob
    images, captions = images[shard.start : shard.end], captions[shard.start : shard.end]
    # The tokenizer encodes in fp32: the committed policy was trained on fp32 codes (under bf16
    # autocast the encoder is 1.5x faster but 1.4% of codes flip; docs/benchmarks.md).
    with torch.no_grad():
        codes = run.backbone.tokenizer.encode_codes(to_model_range(images.to(device))).flatten(1)
    text_emb, text_mask = run.backbone.encode_prompts(captions)
    return SFTBatch(codes=codes, text_emb=text_emb, text_mask=text_mask, dropped=dropped[shard.start : shard.end].to(device))


def policy_step(run: SFTRun, batch: SFTBatch, step: int) -> dict[str, torch.Tensor]:
    """Next-token cross-entropy on every image token; one guarded optimizer step."""
    with autocast(run.start.device, run.start.precision.name):
        logits = run.policy_for_loss(batch.text_emb, batch.codes, batch.text_mask, caption_dropout=batch.dropped, dropout=True)
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch.codes.flatten())
    run.optimizer.zero_grad()
    run.start.accelerator.backward(loss)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.backbone.policy.parameters(), run.scfg.grad_clip)
    run.optimizer.step(step + 1, {"loss": loss, "grad_norm": grad_norm})
    return {"loss": loss, "grad_norm": grad_norm}


def sft_step(run: SFTRun, logger: RunLogger, step: int, bar) -> bool:
    """One step: the batch, the policy step, then the record, the preview grid and the checkpoint
    as they fall due; returns whether it wrote a checkpoint."""
    terms = policy_step(run, next_batch(run), step)
    scfg, start = run.scfg, run.start
    if due(step + 1, scfg.log_every, scfg.steps):
        record = {"step": step + 1, **{name: value.item() for name, value in terms.items()}}
        record |= {"lr": run.optimizer.schedule.get_last_lr()[0], **run.optimizer.guard.metrics()}
        log_record(record, start.accelerator, logger, bar, lambda logged: {"loss": f"{logged['loss']:.3f}"})
    if start.main_process and due(step + 1, scfg.grid_every, scfg.steps):
        grid = sample_images(run.backbone, run.preview_prompts, start.cfg, seed=start.cfg.seed)
        save_image_grid(grid, start.run_dir / f"samples_{step + 1:06d}.png", nrow=8)
    saved = due(step + 1, scfg.save_every, scfg.steps)
    if saved:
        save_sft_checkpoint(run, step + 1)
    return saved


def save_sft_checkpoint(run: SFTRun, step: int) -> None:
    state = trainer_state(step, {"policy": run.optimizer}, {"data": run.data_rng})
    tensors = {"policy": run.backbone.policy.state_dict()}
    save_recipe_checkpoint(run.start.main_process, run.start.run_dir, step, tensors, state, keep_last=2)


def train_sft(config: str | RunConfig, out_dir: str, overrides: list[str] = (), resume: bool = False) -> dict:
    """Train (or with `resume`, continue) the policy in `out_dir`; one process or several under
    `torchrun` / `accelerate launch` (each takes its share of every batch; DDP averages gradients)."""
    return train_recipe(start_sft(config, out_dir, overrides, resume), sft_step, save_sft_checkpoint, evaluate_policy)


def evaluate_policy(run: SFTRun, train_seconds: float) -> dict:
    """Write the policy asset and score its samples for held-out prompts with the verifier (eval.json)."""
    cfg, run_dir = run.start.cfg, run.start.run_dir
    save_asset(run_dir / "toy_policy.safetensors", "policy", {"gpt": cfg.gpt, "text": cfg.text}, run.backbone.policy.state_dict())
    eval_prompts = heldout_prompts(cfg.toy)[: run.scfg.eval_samples]
    result = verifier_accuracy(sample_images(run.backbone, eval_prompts, cfg, seed=cfg.seed), eval_prompts)
    result |= {"train_seconds": round(train_seconds, 1), "steps": run.scfg.steps}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    print(
        f"sft: verifier accuracy {result['accuracy']:.3f} (objects {result['object_accuracy']:.3f}) on "
        f"{len(eval_prompts)} held-out prompts; {train_seconds / 60:.1f} min -> {run_dir / 'toy_policy.safetensors'}"
    )
    return result
