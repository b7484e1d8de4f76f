"""Recipe: train a VQ tokenizer (VQGAN-style) on the toy world.

    ranke train-tokenizer --config configs/toy.yaml --out runs/tokenizer [key=value ...]

Per step: a fresh batch from the seeded toy training stream; the generator loss is
reconstruction (optionally weighted towards object pixels, `object_weight`) + perceptual +
codebook/commitment (+ adaptively weighted PatchGAN hinge loss once `disc_start` is reached);
then one discriminator hinge step. At the end the
model is evaluated (PSNR and codebook usage on the fixed reference image set) and written
as `RUN/toy_tokenizer.safetensors`, the format of the committed asset.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from ranke import checkpoint as checkpoint_lib
from ranke.algo.vqgan import (
    adaptive_generator_weight,
    adopt_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    object_pixel_weight,
    reconstruction_loss,
)
from ranke.assets import save_asset
from ranke.images import save_image_grid
from ranke.models.discriminator import PatchDiscriminator
from ranke.models.perceptual import build_perceptual
from ranke.models.vq import VQModel, to_model_range, to_unit_range
from ranke.parallel import Shard, average_gradients, mean_over_processes, process_group_kwargs, recipe_precision
from ranke.runtime import autocast, progress
from ranke.toy.data import reference_images, train_batch
from ranke.train import state as state_lib
from ranke.train.guard import StepGuard, gradient_norm, guarded_step
from ranke.train.logging import RunLogger, start_run, write_run_config
from ranke.train.preemption import Preemption
from ranke.train.resume import resume_point, set_learning_rate
from ranke.train.schedule import warmup_cosine


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


def train_tokenizer(config_path: str, out_dir: str, overrides: list[str], resume: bool = False) -> dict:
    """Train (or with `resume`, continue) a tokenizer in `out_dir`; one process or several under
    `torchrun` / `accelerate launch`: each takes its share of every batch, gradients are averaged
    (the adaptive GAN weight and the discriminator's BatchNorm statistics stay per process), and
    the codebook's usage window and dead-code restarts see the global batch."""
    from accelerate import Accelerator

    cfg, run, device = start_run(config_path, out_dir, overrides, section="tokenizer")
    tcfg = cfg.tokenizer
    resumed = resume_point(run, cfg, "tokenizer", resume)
    accelerator = Accelerator(cpu=device.type == "cpu", kwargs_handlers=[process_group_kwargs(cfg.collective_timeout)])
    device, main_process = accelerator.device, accelerator.is_main_process
    shard = Shard.of(accelerator, tcfg.batch_size, "tokenizer.batch_size")
    precision = recipe_precision(cfg, accelerator, "tokenizer").name

    model = VQModel(cfg.vq).to(device)
    if accelerator.num_processes > 1:
        model.quantize.gather_codes = accelerator.gather
    disc = PatchDiscriminator(base_channels=tcfg.disc_channels, n_layers=tcfg.disc_layers).to(device)
    perceptual = build_perceptual(tcfg.perceptual, tcfg.vgg_path, tcfg.lpips_lin_path).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay)
    opt_disc = torch.optim.AdamW(disc.parameters(), lr=tcfg.disc_lr, betas=tuple(tcfg.betas), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, tcfg.warmup_steps, tcfg.steps, tcfg.min_lr_ratio)
    )
    data_rng = np.random.default_rng(cfg.seed)
    restart_gen = torch.Generator(device).manual_seed(cfg.seed)
    eval_images = reference_images(cfg.toy, tcfg.eval_images)
    preview = torch.from_numpy(eval_images[:16].copy()).permute(0, 3, 1, 2).float().div(255).to(device)

    guards = {name: StepGuard(name, cfg.max_consecutive_skips, device) for name in ("vq", "disc")}
    start_step = 0
    if resumed is not None:
        tensors, trainer_state, _ = resumed[1]
        model.load_state_dict(tensors["vq"])
        disc.load_state_dict(tensors["discriminator"])
        opt.load_state_dict(trainer_state["optimizer"])
        opt_disc.load_state_dict(trainer_state["optimizer_disc"])
        schedule.load_state_dict(trainer_state["schedule"])
        set_learning_rate(opt, tcfg.lr, schedule)
        set_learning_rate(opt_disc, tcfg.disc_lr)
        state_lib.restore_rng_state(trainer_state["rng"], {"data": data_rng, "restart": restart_gen})
        for name, guard in guards.items():
            guard.load_state_dict(trainer_state.get("guards", {}).get(name, guard.state_dict()))
        start_step = trainer_state["step"]
    if main_process:
        write_run_config(cfg, run)

    def save(step: int) -> None:
        """Checkpoint `step` (the main process writes)."""
        if main_process:
            checkpoint_lib.save_checkpoint(
                run,
                step,
                {"vq": model.state_dict(), "discriminator": disc.state_dict()},
                {
                    "step": step,
                    "optimizer": opt.state_dict(),
                    "optimizer_disc": opt_disc.state_dict(),
                    "schedule": schedule.state_dict(),
                    "rng": state_lib.rng_state({"data": data_rng, "restart": restart_gen}),
                    "guards": {name: guard.state_dict() for name, guard in guards.items()},
                },
                (run / "config.yaml").read_text(),
                keep_last=2,
            )

    logger = RunLogger(run, cfg.log_with, cfg, device, start_step)
    preemption = Preemption(cfg.stop_signals, run, device, main_process)
    t0 = time.perf_counter()
    bar = progress(range(start_step, tcfg.steps), total=tcfg.steps, initial=start_step, desc="tokenizer",
                   disable_on_workers=not main_process)  # fmt: skip
    for step in bar:
        model.train()
        images, _, _ = train_batch(data_rng, tcfg.batch_size, cfg.toy)  # the whole batch; this process's share:
        x = to_model_range(images[shard.start : shard.end].to(device))
        with autocast(device, precision):  # forward passes; pixels, logits and losses are fp32
            quant, vq_losses, codes = model.encode(x)
            recon = model.decode(quant)
            pixel_weight = (
                object_pixel_weight(x, tcfg.object_weight, margin=tcfg.object_margin) if tcfg.object_weight else None
            )
            rec = reconstruction_loss(x, recon, kind=tcfg.recon_kind, pixel_weight=pixel_weight)
            perc = perceptual(x, recon).mean() if tcfg.perceptual_weight > 0 else torch.zeros((), device=device)
            nll = tcfg.recon_weight * rec + tcfg.perceptual_weight * perc
            disc_factor = adopt_weight(step, tcfg.disc_start)
            gen = hinge_generator_loss(disc(recon).float()) if disc_factor > 0 else torch.zeros((), device=device)
            gen_weight = (
                adaptive_generator_weight(nll, gen, model.last_layer) if disc_factor > 0 else torch.zeros((), device=device)
            )
            loss = nll + tcfg.codebook_weight * vq_losses.total + tcfg.disc_weight * disc_factor * gen_weight * gen
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model.parameters(), accelerator)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        guarded_step(guards["vq"], opt, step + 1, {"loss": loss, "grad_norm": grad_norm})
        schedule.step()
        if tcfg.restart_dead_codes_every and (step + 1) % tcfg.restart_dead_codes_every == 0:
            with torch.no_grad(), autocast(device, precision):
                encoded = model.quant_conv(model.encoder(x)).float()
                # every process restarts the same codes from the same vectors of the global batch
                model.quantize.restart_dead_codes(accelerator.gather(encoded), generator=restart_gen)

        disc_loss = torch.zeros(())
        if disc_factor > 0:
            with autocast(device, precision):
                disc_loss = hinge_discriminator_loss(disc(x).float(), disc(recon.detach()).float())
            opt_disc.zero_grad(set_to_none=True)
            disc_loss.backward()
            average_gradients(disc.parameters(), accelerator)
            checked = {"discriminator": disc_loss, "disc_grad_norm": gradient_norm(disc.parameters())}
            guarded_step(guards["disc"], opt_disc, step + 1, checked)

        record = {
            "step": step + 1,
            "loss": loss.item(),
            "recon": rec.item(),
            "perceptual": perc.item(),
            "codebook": vq_losses.codebook.item(),
            "commitment": vq_losses.commitment.item(),
            "generator": gen.item(),
            "generator_weight": float(gen_weight),
            "discriminator": disc_loss.item(),
            "batch_code_usage": codes.unique().numel() / cfg.vq.codebook_size,
            **guards["vq"].metrics(),
            **guards["disc"].metrics(),
        }
        if (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps:
            record = mean_over_processes(record, accelerator)
            if main_process:
                logger.log(record)
                bar.set_postfix(recon=f"{record['recon']:.4f}", usage=f"{record['batch_code_usage']:.2f}")
        if main_process and ((step + 1) % tcfg.grid_every == 0 or step + 1 == tcfg.steps):
            with torch.no_grad():
                model.eval()
                shown = to_unit_range(model.decode(model.encode(to_model_range(preview))[0]))
            save_image_grid(torch.cat([preview, shown]), run / f"reconstructions_{step + 1:06d}.png", nrow=16)
        saved = (step + 1) % tcfg.save_every == 0 or step + 1 == tcfg.steps
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

    result = evaluate_tokenizer(model, eval_images, device)
    result["train_seconds"] = round(train_seconds, 1)
    result["steps"] = tcfg.steps
    (run / "eval.json").write_text(json.dumps(result, indent=2))
    save_asset(run / "toy_tokenizer.safetensors", "vq", cfg.vq, model.state_dict())
    print(
        f"tokenizer: PSNR {result['psnr']:.2f} dB, codebook usage {result['codebook_usage']:.1%} "
        f"on {result['n']} reference images; {train_seconds / 60:.1f} min -> {run / 'toy_tokenizer.safetensors'}"
    )
    return result
