"""Recipe: supervised (next-token) training of the AR policy on the toy world.

    ranke sft --config configs/toy.yaml --out runs/sft precision=bf16 [key=value ...]

Per step: a fresh batch of (image, caption) pairs from the seeded toy stream; the frozen
tokenizer turns images into code sequences and the frozen text encoder turns captions into
embeddings; the policy is trained with cross-entropy on every image token, with caption
dropout (replacing a caption by the unconditional embedding) so classifier-free guidance
works at sampling time. With `precision=bf16` the policy's forward pass runs under bf16 autocast
(faster steps on a CPU with avx512_bf16; the toy policy is compute-limited, so the committed one
was trained this way); codes and the loss stay fp32. The result is written as
`RUN/toy_policy.safetensors`, the format of the committed asset, and evaluated with the verifier
on held-out prompts.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from ranke import checkpoint as checkpoint_lib
from ranke.assets import save_asset
from ranke.backbones.base import Backbone, build_text_encoder, check_compatible
from ranke.backbones.toy import load_tokenizer
from ranke.config import RunConfig
from ranke.images import save_image_grid
from ranke.models.gpt import Transformer
from ranke.models.vq import to_model_range
from ranke.parallel import Shard, mean_over_processes, process_group_kwargs, recipe_precision
from ranke.runtime import autocast, progress
from ranke.toy.data import heldout_prompts, train_batch
from ranke.toy.verifier import score_image, summarize
from ranke.train import state as state_lib
from ranke.train.guard import StepGuard, guarded_step
from ranke.train.logging import RunLogger, start_run, write_run_config
from ranke.train.preemption import Preemption
from ranke.train.resume import resume_point, set_learning_rate
from ranke.train.schedule import warmup_cosine


@torch.no_grad()
def sample_images(backbone: Backbone, prompts: list[str], cfg: RunConfig, seed: int, batch_size: int = 64):
    """Images [N,3,H,W] in [0,1] for `prompts`, one per prompt, reproducible from `seed`."""
    generator = torch.Generator(backbone.device).manual_seed(seed)
    return torch.cat([images for _, images in backbone.generate_images(prompts, cfg.sampling, generator, batch_size)])


def verifier_accuracy(images: torch.Tensor, prompts: list[str]) -> dict:
    return summarize([score_image(image, prompt) for image, prompt in zip(images, prompts)])


def train_sft(config_path: str, out_dir: str, overrides: list[str], resume: bool = False) -> dict:
    """Train (or with `resume`, continue) the policy in `out_dir`; one process or several under
    `torchrun` / `accelerate launch` (each takes its share of every batch; DDP averages gradients)."""
    from accelerate import Accelerator

    cfg, run, device = start_run(config_path, out_dir, overrides, section="sft")
    scfg = cfg.sft
    resumed = resume_point(run, cfg, "sft", resume)
    accelerator = Accelerator(cpu=device.type == "cpu", kwargs_handlers=[process_group_kwargs(cfg.collective_timeout)])
    device, main_process = accelerator.device, accelerator.is_main_process
    shard = Shard.of(accelerator, scfg.batch_size, "sft.batch_size")
    precision = recipe_precision(cfg, accelerator, "sft").name

    tokenizer = load_tokenizer(scfg.tokenizer, device).requires_grad_(False)
    check_compatible(cfg.gpt, tokenizer.args, cfg.text, cfg.toy.image_size)
    if main_process:
        write_run_config(cfg, run)
    policy = Transformer(cfg.gpt).to(device)
    policy_for_loss = accelerator.prepare(policy)  # DDP with several processes
    backbone = Backbone(build_text_encoder(cfg.text, device), policy, tokenizer)
    decay = [p for p in policy.parameters() if p.dim() >= 2]
    no_decay = [p for p in policy.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": scfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=scfg.lr,
        betas=tuple(scfg.betas),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, scfg.warmup_steps, scfg.steps, scfg.min_lr_ratio)
    )
    data_rng = np.random.default_rng(cfg.seed)
    preview_prompts = heldout_prompts(cfg.toy)[: scfg.eval_prompts]

    guard = StepGuard("policy", cfg.max_consecutive_skips, device)
    start_step = 0
    if resumed is not None:
        tensors, trainer_state, _ = resumed[1]
        policy.load_state_dict(tensors["policy"])
        opt.load_state_dict(trainer_state["optimizer"])
        schedule.load_state_dict(trainer_state["schedule"])
        set_learning_rate(opt, scfg.lr, schedule)
        state_lib.restore_rng_state(trainer_state["rng"], {"data": data_rng})
        guard.load_state_dict(trainer_state.get("guard", guard.state_dict()))
        start_step = trainer_state["step"]

    def save(step: int) -> None:
        """Checkpoint `step` (the main process writes)."""
        if main_process:
            checkpoint_lib.save_checkpoint(
                run,
                step,
                {"policy": policy.state_dict()},
                {
                    "step": step,
                    "optimizer": opt.state_dict(),
                    "schedule": schedule.state_dict(),
                    "rng": state_lib.rng_state({"data": data_rng}),
                    "guard": guard.state_dict(),
                },
                (run / "config.yaml").read_text(),
                keep_last=2,
            )

    logger = RunLogger(run, cfg.log_with, cfg, device, start_step)
    preemption = Preemption(cfg.stop_signals, run, device, main_process)
    t0 = time.perf_counter()
    bar = progress(range(start_step, scfg.steps), total=scfg.steps, initial=start_step, desc="sft",
                   disable_on_workers=not main_process)  # fmt: skip
    for step in bar:
        # every process draws the whole batch (and its caption dropout) and keeps its share
        images, captions, _ = train_batch(data_rng, scfg.batch_size, cfg.toy)
        dropped = torch.rand(scfg.batch_size) < cfg.gpt.class_dropout_prob
        images, captions = images[shard.start : shard.end], captions[shard.start : shard.end]
        dropped = dropped[shard.start : shard.end].to(device)
        # The tokenizer encodes in fp32: the committed policy was trained on fp32 codes (under bf16
        # autocast the encoder is 1.5x faster but 1.4% of codes flip; docs/benchmarks.md).
        with torch.no_grad():
            codes = tokenizer.encode_codes(to_model_range(images.to(device))).flatten(1)
        text_emb, text_mask = backbone.encode_prompts(captions)
        with autocast(device, precision):
            logits = policy_for_loss(text_emb, codes, text_mask, caption_dropout=dropped, dropout=True)
        loss = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), scfg.grad_clip)
        guarded_step(guard, opt, step + 1, {"loss": loss, "grad_norm": grad_norm})
        schedule.step()

        if (step + 1) % scfg.log_every == 0 or step + 1 == scfg.steps:
            record = {
                "step": step + 1, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": schedule.get_last_lr()[0],
                **guard.metrics(),
            }  # fmt: skip
            record = mean_over_processes(record, accelerator)
            if main_process:
                logger.log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
        if main_process and ((step + 1) % scfg.grid_every == 0 or step + 1 == scfg.steps):
            grid = sample_images(backbone, preview_prompts, cfg, seed=cfg.seed)
            save_image_grid(grid, run / f"samples_{step + 1:06d}.png", nrow=8)
        saved = (step + 1) % scfg.save_every == 0 or step + 1 == scfg.steps
        if saved:
            save(step + 1)
        if preemption.requested(step + 1):  # a stop signal reached some process: all stop after this step
            logger.close()
            preemption.stop(save=None if saved else lambda: save(step + 1))
    preemption.close()
    train_seconds = time.perf_counter() - t0
    logger.close()
    accelerator.wait_for_everyone()
    if not main_process:
        return {}

    save_asset(run / "toy_policy.safetensors", "policy", {"gpt": cfg.gpt, "text": cfg.text}, policy.state_dict())
    eval_prompts = heldout_prompts(cfg.toy)[: scfg.eval_samples]
    result = verifier_accuracy(sample_images(backbone, eval_prompts, cfg, seed=cfg.seed), eval_prompts)
    result["train_seconds"] = round(train_seconds, 1)
    result["steps"] = scfg.steps
    (run / "eval.json").write_text(json.dumps(result, indent=2))
    print(
        f"sft: verifier accuracy {result['accuracy']:.3f} (objects {result['object_accuracy']:.3f}) on "
        f"{len(eval_prompts)} held-out prompts; {train_seconds / 60:.1f} min -> {run / 'toy_policy.safetensors'}"
    )
    return result
