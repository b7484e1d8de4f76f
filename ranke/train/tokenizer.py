"""Recipe: train a VQ tokenizer (VQGAN-style) on the toy world.

    ranke train-tokenizer --config configs/toy.yaml --out runs/tokenizer [key=value ...]

Per step: a fresh batch from the seeded toy training stream; the generator step
(`tokenizer_step`) minimises L_recon (`ranke.algo.decoder.reconstruction_anchor_loss`: pixel loss,
optionally weighted towards object pixels, `object_weight`, + perceptual + the adaptively weighted
PatchGAN hinge loss once `disc_start` is reached) + codebook/commitment; dead codes are restarted
every `restart_dead_codes_every` steps; then one discriminator hinge step
(`ranke.train.discriminator`, post-training's own). At the end the model is evaluated (PSNR and
codebook usage on the fixed reference image set) and written as `RUN/toy_tokenizer.safetensors`,
the format of the committed asset.

Set-up, resume, stop signals and checkpoints are every recipe's (`ranke.train.run`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from ranke.algo.decoder import reconstruction_anchor_loss
from ranke.algo.vqgan import (
    adaptive_generator_weight,
    adopt_weight,
    hinge_generator_loss,
    object_pixel_weight,
    reconstruction_loss,
)
from ranke.assets import save_asset
from ranke.config import RunConfig, TokenizerTrainConfig
from ranke.images import save_image_grid
from ranke.models.discriminator import PatchDiscriminator
from ranke.models.perceptual import build_perceptual
from ranke.models.vq import VQModel, to_model_range, to_unit_range
from ranke.parallel import Shard, average_gradients
from ranke.runtime import autocast
from ranke.toy.data import reference_images, train_batch
from ranke.train.discriminator import discriminator_step
from ranke.train.guard import StepGuard
from ranke.train.logging import RunLogger
from ranke.train.run import RunStart, begin_run, due, log_record, save_recipe_checkpoint, train_recipe, write_run_config
from ranke.train.schedule import warmup_cosine
from ranke.train.trainer_state import GuardedOptimizer, restore_trainer_state, trainer_state, upgrade


@torch.no_grad()
def evaluate_tokenizer(model: VQModel, images_uint8: np.ndarray, device, batch_size: int = 100) -> dict:
    """PSNR (dB, images in [0,1]) and codebook usage of `model` on a fixed image set."""
    model.eval()
    squared_errors, used = [], torch.zeros(model.args.codebook_size, dtype=torch.bool)
    for start in range(0, len(images_uint8), batch_size):
        batch = torch.from_numpy(images_uint8[start : start + batch_size].copy()).permute(0, 3, 1, 2).float() / 255
        batch = batch.to(device)
        quant, _, codes = model.encode(to_model_range(batch))
        recon = to_unit_range(model.decode(quant))
        squared_errors.append(((recon - batch) ** 2).flatten(1).mean(1).cpu())
        used[codes.flatten().cpu()] = True
    mse = torch.cat(squared_errors)
    psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-12))).mean().item()
    return {"psnr": psnr, "codebook_usage": used.float().mean().item(), "n": len(images_uint8)}


@dataclass
class TokenizerRun:
    """A tokenizer run as its stages see it (built once by `start_tokenizer`)."""

    start: RunStart
    shard: Shard  # this process's share of every batch
    model: VQModel
    disc: PatchDiscriminator
    perceptual: torch.nn.Module
    optimizers: dict[str, GuardedOptimizer]  # "vq" (warm-up + cosine schedule) and "disc"
    generators: dict[str, np.random.Generator | torch.Generator]  # "data" and "restart" (dead codes), checkpointed
    eval_images: np.ndarray  # the reference images of the final evaluation; the first 16 are the preview

    @property
    def tcfg(self) -> TokenizerTrainConfig:
        return self.start.cfg.tokenizer


def build_optimizers(model: VQModel, disc: PatchDiscriminator, tcfg: TokenizerTrainConfig, guard_limit: int, device):
    """AdamW for the tokenizer (warm-up + cosine) and for the discriminator, each with its guard."""
    adamw = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay)
    adamw_disc = torch.optim.AdamW(disc.parameters(), lr=tcfg.disc_lr, betas=tuple(tcfg.betas), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        adamw, lambda step: warmup_cosine(step, tcfg.warmup_steps, tcfg.steps, tcfg.min_lr_ratio)
    )
    guards = {name: StepGuard(name, guard_limit, device) for name in ("vq", "disc")}
    return {
        "vq": GuardedOptimizer(optimizer=adamw, module=model, guard=guards["vq"], lr=tcfg.lr, schedule=schedule),
        "disc": GuardedOptimizer(optimizer=adamw_disc, module=disc, guard=guards["disc"], lr=tcfg.disc_lr),
    }


def start_tokenizer(config: str | RunConfig, out_dir: str, overrides: list[str], resume: bool) -> tuple[TokenizerRun, int]:
    """Set the run up (`ranke.train.run.begin_run`), build the tokenizer, its discriminator and
    perceptual distance, restore a checkpoint with `resume`; returns the run and the step to start from."""
    start = begin_run(config, out_dir, overrides, "tokenizer", resume)
    cfg, tcfg, device, accelerator = start.cfg, start.cfg.tokenizer, start.device, start.accelerator
    shard = Shard.of(accelerator, tcfg.batch_size, "tokenizer.batch_size")
    model = VQModel(cfg.vq).to(device)
    if accelerator.num_processes > 1:  # the codebook's usage window and restarts see the global batch
        model.quantize.gather_codes = accelerator.gather
    disc = PatchDiscriminator(base_channels=tcfg.disc_channels, n_layers=tcfg.disc_layers).to(device)
    run = TokenizerRun(
        start=start, shard=shard, model=model, disc=disc,
        perceptual=build_perceptual(tcfg.perceptual, tcfg.vgg_path, tcfg.lpips_lin_path).to(device),
        optimizers=build_optimizers(model, disc, tcfg, cfg.max_consecutive_skips, device),
        generators={"data": np.random.default_rng(cfg.seed), "restart": torch.Generator(device).manual_seed(cfg.seed)},
        eval_images=reference_images(cfg.toy, tcfg.eval_images),
    )  # fmt: skip
    start_step = 0
    if start.resumed is not None:
        tensors, saved = start.resumed[0], upgrade(start.resumed[1], "tokenizer")
        model.load_state_dict(tensors["vq"])
        disc.load_state_dict(tensors["discriminator"])
        restore_trainer_state(saved, run.optimizers, run.generators)
        start_step = saved["step"]
    if start.main_process:
        write_run_config(cfg, start.run_dir)
    return run, start_step


def next_images(run: TokenizerRun) -> torch.Tensor:
    """The step's images in the model's range: every process draws the whole batch and keeps its share."""
    images, _, _ = train_batch(run.generators["data"], run.tcfg.batch_size, run.start.cfg.toy)
    return to_model_range(images[run.shard.start : run.shard.end].to(run.start.device))


def tokenizer_step(run: TokenizerRun, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict, float]:
    """The generator step: L_recon + codebook/commitment, one guarded optimizer step (gradients
    averaged over processes). Returns the reconstruction, the loss terms and the share of the
    codebook the batch used."""
    tcfg, model, device = run.tcfg, run.model, run.start.device
    model.train()
    zero = torch.zeros((), device=device)
    with autocast(device, run.start.precision.name):  # forward passes; pixels, logits and losses are fp32
        quant, vq_losses, codes = model.encode(x)
        recon = model.decode(quant)
        pixel_weight = object_pixel_weight(x, tcfg.object_weight, margin=tcfg.object_margin) if tcfg.object_weight else None
        rec = reconstruction_loss(x, recon, kind=tcfg.recon_kind, pixel_weight=pixel_weight)
        perc = run.perceptual(x, recon).mean() if tcfg.perceptual_weight > 0 else zero
        pixel = tcfg.recon_weight * rec
        disc_factor = adopt_weight(step, tcfg.disc_start)
        gen = hinge_generator_loss(run.disc(recon).float()) if disc_factor > 0 else zero
        nll = pixel + tcfg.perceptual_weight * perc
        gen_weight = adaptive_generator_weight(nll, gen, model.last_layer) if disc_factor > 0 else zero
        recon_loss = reconstruction_anchor_loss(
            pixel, perc, gen, gen_weight, perceptual_weight=tcfg.perceptual_weight, disc_weight=tcfg.disc_weight,
            disc_factor=disc_factor,
        )  # fmt: skip
        loss = recon_loss + tcfg.codebook_weight * vq_losses.total
    optimizer = run.optimizers["vq"]
    optimizer.zero_grad()
    loss.backward()
    average_gradients(model.parameters(), run.start.accelerator)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
    optimizer.step(step + 1, {"loss": loss, "grad_norm": grad_norm})
    terms = {
        "loss": loss, "recon": rec, "perceptual": perc, "codebook": vq_losses.codebook,
        "commitment": vq_losses.commitment, "generator": gen, "generator_weight": gen_weight,
    }  # fmt: skip
    return recon, terms, codes.unique().numel() / model.args.codebook_size


@torch.no_grad()
def restart_dead_codes(run: TokenizerRun, x: torch.Tensor) -> None:
    """Every process restarts the same unused codes from the same vectors of the global batch."""
    with autocast(run.start.device, run.start.precision.name):
        encoded = run.model.quant_conv(run.model.encoder(x)).float()
        run.model.quantize.restart_dead_codes(run.start.accelerator.gather(encoded), generator=run.generators["restart"])


def tokenizer_train_step(run: TokenizerRun, logger: RunLogger, step: int, bar) -> bool:
    """One step: the generator step, the dead-code restart when due, the discriminator step, then
    the record, the reconstruction preview and the checkpoint as they fall due; returns whether it
    wrote a checkpoint."""
    tcfg, start = run.tcfg, run.start
    x = next_images(run)
    recon, terms, code_usage = tokenizer_step(run, x, step)
    if tcfg.restart_dead_codes_every and (step + 1) % tcfg.restart_dead_codes_every == 0:
        restart_dead_codes(run, x)
    disc = discriminator_step(
        run.disc, run.optimizers["disc"], x, recon, step, start.accelerator, start.precision.name,
        started=adopt_weight(step, tcfg.disc_start) > 0,
    )  # fmt: skip
    record = {
        "step": step + 1, **{name: float(value) for name, value in terms.items()}, "discriminator": disc.loss.item(),
        "batch_code_usage": code_usage, **run.optimizers["vq"].guard.metrics(), **run.optimizers["disc"].guard.metrics(),
    }  # fmt: skip
    if due(step + 1, tcfg.log_every, tcfg.steps):
        postfix = lambda logged: {"recon": f"{logged['recon']:.4f}", "usage": f"{logged['batch_code_usage']:.2f}"}  # noqa: E731
        log_record(record, start.accelerator, logger, bar, postfix)
    if start.main_process and due(step + 1, tcfg.grid_every, tcfg.steps):
        save_reconstructions(run, step + 1)
    saved = due(step + 1, tcfg.save_every, tcfg.steps)
    if saved:
        save_tokenizer_checkpoint(run, step + 1)
    return saved


@torch.no_grad()
def save_reconstructions(run: TokenizerRun, step: int) -> None:
    """The first 16 reference images over their reconstructions."""
    preview = torch.from_numpy(run.eval_images[:16].copy()).permute(0, 3, 1, 2).float().div(255).to(run.start.device)
    run.model.eval()
    shown = to_unit_range(run.model.decode(run.model.encode(to_model_range(preview))[0]))
    save_image_grid(torch.cat([preview, shown]), run.start.run_dir / f"reconstructions_{step:06d}.png", nrow=16)


def save_tokenizer_checkpoint(run: TokenizerRun, step: int) -> None:
    state = trainer_state(step, run.optimizers, run.generators)
    tensors = {"vq": run.model.state_dict(), "discriminator": run.disc.state_dict()}
    save_recipe_checkpoint(run.start.main_process, run.start.run_dir, step, tensors, state, keep_last=2)


def train_tokenizer(config: str | RunConfig, out_dir: str, overrides: list[str] = (), resume: bool = False) -> dict:
    """Train (or with `resume`, continue) a tokenizer in `out_dir`; one process or several under
    `torchrun` / `accelerate launch`: each takes its share of every batch, gradients are averaged
    (the adaptive GAN weight and the discriminator's BatchNorm statistics stay per process), and
    the codebook's usage window and dead-code restarts see the global batch."""
    return train_recipe(start_tokenizer(config, out_dir, overrides, resume), tokenizer_train_step, save_tokenizer_checkpoint, finish_tokenizer)


def finish_tokenizer(run: TokenizerRun, train_seconds: float) -> dict:
    """Evaluate on the reference images (eval.json) and write the tokenizer asset."""
    run_dir = run.start.run_dir
    result = evaluate_tokenizer(run.model, run.eval_images, run.start.device)
    result |= {"train_seconds": round(train_seconds, 1), "steps": run.tcfg.steps}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    save_asset(run_dir / "toy_tokenizer.safetensors", "vq", run.start.cfg.vq, run.model.state_dict())
    print(
        f"tokenizer: PSNR {result['psnr']:.2f} dB, codebook usage {result['codebook_usage']:.1%} "
        f"on {result['n']} reference images; {train_seconds / 60:.1f} min -> {run_dir / 'toy_tokenizer.safetensors'}"
    )
    return result
