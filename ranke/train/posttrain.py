"""Recipe: post-training with GRPO (policy stage) and RankE's decoder stage (METHOD.md section 3).

    ranke posttrain --config configs/toy.yaml --out runs/rank_e [mode=policy|decoder|both|pixel|pixel_and_decoder] [key=value ...]

One step, for B prompts with their real images:

1. rollout (no grad): G token sequences per prompt from the online policy with CFG; their
   log-probs under the online policy (`old`) and the reference policy (`ref`); decoded by the
   EMA decoder; scored by the combined reward;
2. policy stage (modes `policy`, `both`): GRPO on group-relative advantages for `grpo_epochs`
   passes; the EMA policy follows every `policy_ema_every` policy steps;
3. decoder stage (modes `decoder`, `both`): rank-select the top-K rollouts per prompt, one
   discriminator step (real images vs reconstructions of their codes), then one decoder step on
   L_recon + L_rankgan + L_consist + L_reward (+ L_soft); only the decoder and `post_quant_conv`
   train, so the token space never moves; the EMA decoder follows every `decoder_ema_every` steps.

The pixel modes (`pixel`, `pixel_and_decoder`: VA-π) replace step 1 by teacher-forced predictions
of the real images' codes scored by reconstruction (`ranke.train.pixel_rollout`) and add the
likelihood regulariser to the policy stage.

Written on accelerate (single process by default; several processes split the prompts, with the
policy in DDP or sharded by FSDP, `ranke.parallel`); `precision=bf16` runs the forward passes under
autocast. Every `log_every` steps a record goes to the run log (`metrics.jsonl` plus TensorBoard or
Weights & Biases, `ranke.train.logging.RunLogger`); checkpoints are atomic (`ranke.checkpoint`)
and `--resume` continues bit-exactly. A stop signal (`stop_signals`) ends the run after the current
step with its checkpoint (`ranke.train.preemption`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ranke import checkpoint as checkpoint_lib
from ranke.algo.decoder import (
    DecoderTerms,
    DecoderWeights,
    consistency_weight,
    cosine_tau,
    decoder_consistency_loss,
    decoder_objective,
    optional_reward_backprop_loss,
    rank_gan_loss,
    rank_weights,
    reconstruction_anchor_loss,
    select_top_k,
    soft_codes,
    soft_token_consistency_loss,
)
from ranke.algo.pixel import with_likelihood_regulariser
from ranke.algo.policy_losses import policy_advantages, policy_loss, spread_groups
from ranke.algo.vqgan import adaptive_generator_weight, adopt_weight, hinge_generator_loss, reconstruction_loss
from ranke.backbones import Backbone
from ranke.config import PosttrainConfig, RunConfig
from ranke.data import PromptSource
from ranke.images import save_image_grid
from ranke.models.vq import to_model_range, to_unit_range
from ranke.parallel import (
    Shard,
    average_gradients,
    check_replicas,
    clip_gradients,
    mean_over_processes,
    shard_policy,
    uses_fsdp,
    whole_weights,
)
from ranke.precision import PrecisionChoice
from ranke.rewards.build import build_posttrain_reward, probe_user_rewards
from ranke.rewards.combine import CombinedReward
from ranke.runtime import UserError, autocast, progress_bars_off, progress_line, set_deterministic
from ranke.sampling import chosen_logprobs, entropies
from ranke.toy.data import heldout_prompts
from ranke.train.discriminator import discriminator_step
from ranke.train.logging import MetricsWriter, RunLogger
from ranke.train.pixel_rollout import collect_pixel_rollout
from ranke.train.posttrain_models import Models, build_models, build_optimizers, check_lora
from ranke.train.prompts import build_prompt_source
from ranke.train.rollouts import Rollout, join_rollouts, rollout_rows
from ranke.train.run import RunStart, begin_run, due, run_steps, save_recipe_checkpoint, write_run_config
from ranke.train.trainer_state import GuardedOptimizer, restore_trainer_state, trainer_state, upgrade
from ranke.train.user_objects import UserObjects

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ranke.eval.evaluate import Evaluator

def check_posttrain_config(pcfg: PosttrainConfig) -> None:
    """One clear line for settings the loop cannot run with together (each number's own range is
    `ranke.domains`', each choice's values `ranke.choices`', checked when the config is built)."""
    if not 1 <= pcfg.rank_top_k <= pcfg.group_size:
        raise UserError(f"rank_top_k={pcfg.rank_top_k} must be between 1 and group_size={pcfg.group_size}")
    check_lora(pcfg)
    if pcfg.aligns_pixels and pcfg.soft_token_weight > 0:
        raise UserError(
            f"posttrain.soft_token_weight={pcfg.soft_token_weight}: L_soft is not defined on the pixel modes' "
            f"teacher-forced predictions; set soft_token_weight=0 with mode={pcfg.mode}"
        )
    if pcfg.consistency_schedule == "none":
        return
    start, end = pcfg.consistency_span  # checked here once: every step's lambda_c reads it
    if end > pcfg.steps:
        raise UserError(f"posttrain.consistency_end_step={end} must be <= steps={pcfg.steps}")
    if start >= end:
        raise UserError(
            f"posttrain.consistency_start_step={start} must be below consistency_end_step={end} "
            f"(the end of the ramp; by default steps // 4)"
        )


def rank_weight_entropy(weights: torch.Tensor) -> float:
    """Mean entropy (nats) of each prompt's rank weights normalised to a distribution; log k when uniform."""
    distribution = weights / weights.sum(dim=-1, keepdim=True)
    return max(0.0, float(-(distribution * distribution.clamp_min(1e-12).log()).sum(dim=-1).mean()))


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str):
    """Record the seconds the block takes as `timings[name]`."""
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


@dataclass
class PosttrainRun:
    """A post-training run as the stages of its steps see it (built once by `start_posttrain`)."""

    cfg: RunConfig  # with the models' own arguments (`build_models`)
    run_dir: Path
    backbone: Backbone
    models: Models
    optimizers: dict[str, GuardedOptimizer]  # what trains, by name: policy; decoder and disc
    policy_for_loss: torch.nn.Module  # the policy whose forward the GRPO loss runs (DDP-wrapped unless sharded)
    reward: CombinedReward
    prompt_source: PromptSource
    generators: dict[str, np.random.Generator | torch.Generator]  # "data" (numpy) and "rollout" (torch), checkpointed
    accelerator: Accelerator
    shard: Shard  # this process's share of every step's prompts
    precision: PrecisionChoice  # the forward passes' precision (ranke.precision) and why
    sharding: str  # how the policy is spread over processes: ddp | fsdp

    @property
    def pcfg(self) -> PosttrainConfig:
        return self.cfg.posttrain

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def next_prompts(run: PosttrainRun) -> tuple[list[str], torch.Tensor]:
    """This process's share of the step's (prompts, real images): every process draws the whole
    batch from the shared stream and keeps its rows."""
    prompts, real_images = run.prompt_source.next_batch(run.pcfg.prompts_per_step)
    shard = run.shard
    return prompts[shard.start : shard.end], real_images[shard.start : shard.end].to(run.device)


@torch.no_grad()
def collect_rollout(run: PosttrainRun, prompts: list[str], timings: dict[str, float]) -> Rollout:
    """METHOD.md "Rollout": sample, record old/ref log-probs, decode with the EMA decoder, reward.

    The policy and decoder run under the run's precision (ranke.runtime.autocast); log-probs,
    pixels and rewards are float32 either way. `prompts` are this process's share of the step's
    prompts; its rows of the global batch's random draws are used, so the tokens do not depend
    on the number of processes."""
    backbone, models, pcfg, shard = run.backbone, run.models, run.pcfg, run.shard
    group_prompts = [prompt for prompt in prompts for _ in range(pcfg.group_size)]
    with timed(timings, "rollout"):
        text_emb, text_mask = backbone.encode_prompts(group_prompts)
        with autocast(backbone.device, run.precision.name), whole_weights(models.policy):
            sample = backbone.sample(
                text_emb, text_mask, run.cfg.sampling, run.generators["rollout"], policy=models.policy,
                return_logprobs=True, row_offset=shard.start * pcfg.group_size, total_rows=shard.total * pcfg.group_size,
            )  # fmt: skip
    with timed(timings, "logprobs"), autocast(backbone.device, run.precision.name), models.reference_policy() as reference:
        logp_ref = backbone.token_logprobs(reference, text_emb, text_mask, sample.tokens)
    with timed(timings, "decode"), autocast(backbone.device, run.precision.name):
        images = backbone.decode(sample.tokens, decoder=models.vq_ema.module)
    with timed(timings, "reward"):
        scored = run.reward(images, group_prompts)
    soft_logits = None
    if pcfg.soft_token_weight > 0 and pcfg.soft_token_logits == "rollout":
        with autocast(backbone.device, run.precision.name), whole_weights(models.policy):
            logits = backbone.token_logits(models.policy, text_emb, text_mask, sample.tokens).float()
        soft_logits = logits.topk(min(pcfg.soft_token_top_k, logits.shape[-1]), dim=-1)
    return Rollout(
        group_prompts, text_emb, text_mask, sample.tokens, sample.logprobs, logp_ref, images, scored.total,
        scored.components, scored.nonfinite, soft_logits,
    )  # fmt: skip


def step_rollout(run: PosttrainRun, prompts: list[str], real_images: torch.Tensor, timings: dict[str, float]) -> Rollout:
    """The step's rollouts: in the pixel modes VA-π's predictions of the real images' codes scored
    by reconstruction (`ranke.train.pixel_rollout`), else free samples scored by the reward."""
    if not run.pcfg.aligns_pixels:
        return collect_rollout(run, prompts, timings)
    with timed(timings, "rollout"):
        return collect_pixel_rollout(run, prompts, real_images)


def reward_statistics(rollout: Rollout, group_size: int) -> dict[str, float]:
    """The step's reward: its mean, each component's mean and spread, and the share of groups
    whose rollouts all scored alike (they carry no GRPO signal)."""
    record = {"reward": float(rollout.reward.mean())}
    for name, values in rollout.components.items():
        record[f"reward/{name}_mean"] = float(values.float().nanmean())
        record[f"reward/{name}_std"] = float(values.float().std())
        record[f"reward/{name}_nonfinite"] = rollout.nonfinite[name]
    grouped = rollout.reward.view(-1, group_size)
    record["reward/zero_std_groups"] = float((grouped.std(dim=1) < 1e-4).float().mean())
    return record


def refill_groups(run: PosttrainRun, rollout: Rollout, real_images: torch.Tensor) -> tuple[Rollout, torch.Tensor, dict]:
    """DAPO's dynamic sampling: while fewer of the step's groups (over all processes) have rewards
    that differ (`spread_groups`) than it has prompts, roll out the next batch of prompts, at most
    `dynamic_sampling_draws` times; keep this process's first B groups with a spread, in draw
    order, filled up with all-equal groups when the bound is reached. Returns the rollout, its real
    images and the record: the extra draws and the share of kept groups with a spread."""
    pcfg, batch = run.pcfg, real_images.shape[0]
    parts, images = [rollout], [real_images]
    spread = spread_groups(rollout.reward, pcfg.group_size)
    draws = 0
    while draws < pcfg.dynamic_sampling_draws and global_count(run, spread) < pcfg.prompts_per_step:
        prompts, real = next_prompts(run)
        parts.append(step_rollout(run, prompts, real, {}))
        images.append(real)
        spread = torch.cat([spread, spread_groups(parts[-1].reward, pcfg.group_size)])
        draws += 1
    groups = torch.cat([spread.nonzero().flatten(), (~spread).nonzero().flatten()])[:batch]
    rows = (groups[:, None] * pcfg.group_size + torch.arange(pcfg.group_size, device=groups.device)).flatten()
    record = {"dynamic_sampling/draws": draws, "dynamic_sampling/spread_groups": float(spread[groups].float().mean())}
    return rollout_rows(join_rollouts(parts), rows), torch.cat(images)[groups.to(real_images.device)], record


def global_count(run: PosttrainRun, flags: torch.Tensor) -> int:
    """How many of `flags` are set over all processes (every process takes part)."""
    return int(run.accelerator.reduce(flags.sum().to(run.device), reduction="sum"))


def policy_stage(run: PosttrainRun, rollout: Rollout, step: int) -> dict:
    """METHOD.md "Policy stage": `grpo_epochs` passes of the policy loss `loss_type` (the release's
    clipped GRPO, Dr. GRPO, DAPO or GSPO, `ranke.algo.policy_losses`) with the KL anchor on the
    group-relative advantages, each one optimizer step over all rollouts (micro-batched
    forward/backward), skipped when its loss or gradient norm is not finite (the optimizer's guard);
    then the EMA policy follows every `policy_ema_every` steps, unless no pass updated the policy."""
    pcfg, models, optimizer = run.pcfg, run.models, run.optimizers["policy"]
    # the release's ablation: every rollout reinforced alike, the ranking ignored
    advantages = (
        torch.ones_like(rollout.reward) if pcfg.uniform_advantages
        else policy_advantages(pcfg.loss_type, rollout.reward, pcfg.group_size)
    )  # fmt: skip
    clip_low, clip_high = pcfg.clip_range
    count = rollout.tokens.shape[0]
    micro = pcfg.micro_batch_size or count
    totals: dict[str, float] = {}
    stepped = False
    for _ in range(pcfg.grpo_epochs):
        optimizer.zero_grad()
        epoch_loss = 0.0
        for start in range(0, count, micro):
            part = slice(start, start + micro)
            share = (min(start + micro, count) - start) / count
            with models.training_forward():
                logp_new, entropy, logp_real = policy_logprobs(run, rollout, part)
            loss, stats = policy_loss(
                pcfg.loss_type, logp_new, rollout.logp_old[part], rollout.logp_ref[part], advantages[part],
                clip_low, clip_high, beta=pcfg.kl_coef, kl_kind=pcfg.kl_kind,
            )  # fmt: skip
            if logp_real is not None:  # the pixel modes: VA-π's likelihood regulariser
                loss, stats = with_likelihood_regulariser(loss, stats, logp_real, pcfg.likelihood_weight)
            run.accelerator.backward(loss * share)
            epoch_loss += float(loss.detach()) * share
            stats = {**stats, "loss": loss.detach(), "entropy": entropy.detach().mean()}
            for name, value in stats.items():
                totals[name] = totals.get(name, 0.0) + float(value) * share / pcfg.grpo_epochs
        totals["grad_norm"] = clip_gradients(run.policy_for_loss.parameters(), pcfg.grad_clip)
        checked = {"policy/loss": epoch_loss, "policy/grad_norm": totals["grad_norm"]}
        stepped = optimizer.step(step + 1, checked) or stepped
    if stepped and (step + 1) % pcfg.policy_ema_every == 0:
        models.policy_ema.update(models.policy)
    return {
        **{f"policy/{name}": value for name, value in totals.items()}, **optimizer.guard.metrics(),
        "lr/policy": optimizer.current_lr,
    }  # fmt: skip


def policy_logprobs(run: PosttrainRun, rollout: Rollout, part: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The online policy's teacher-forced log-probs [n, N] of the tokens of rollouts `part` and
    its entropies, differentiable, from one forward on their context: the tokens themselves, or in
    the pixel modes the corrupted real codes, whose forward also gives the real codes' log-probs
    (else None)."""
    context = rollout.tokens if rollout.context is None else rollout.context
    with autocast(run.backbone.device, run.precision.name):
        log_probs = run.backbone.token_logits(
            run.policy_for_loss, rollout.text_emb[part], rollout.text_mask[part], context[part]
        ).log_softmax(dim=-1)
    logp_real = None if rollout.real_codes is None else chosen_logprobs(log_probs, rollout.real_codes[part])
    return chosen_logprobs(log_probs, rollout.tokens[part]), entropies(log_probs), logp_real


@dataclass
class RankSelection:
    """The top-k rollouts of every prompt (METHOD.md "Rank selection"), flattened prompt-major."""

    indices: torch.Tensor  # [B*k] rows of the rollout
    weights: torch.Tensor  # [B*k] rank weights, mean 1
    weights_grid: torch.Tensor  # [B, k] the same, per prompt
    tau: float  # the rank temperature of this step
    tokens: torch.Tensor  # [B*k, N]
    prompts: list[str]  # B*k


def select_rollouts(rollout: Rollout, batch: int, pcfg: PosttrainConfig, step: int) -> RankSelection:
    """Each prompt's `rank_top_k` best rollouts and their rank weights at this step's tau."""
    grouped = rollout.reward.view(batch, pcfg.group_size)
    top = select_top_k(grouped, pcfg.rank_top_k)  # [B, k]
    tau = cosine_tau(step, pcfg.steps, pcfg.tau_start, pcfg.tau_end, pcfg.tau_anneal_ratio)
    weights_grid = rank_weights(grouped.gather(1, top), tau, uniform=pcfg.uniform_weights)
    indices = (top + torch.arange(batch, device=top.device)[:, None] * pcfg.group_size).flatten()
    prompts = [rollout.prompts[i] for i in indices.tolist()]
    return RankSelection(
        indices=indices, weights=weights_grid.flatten(), weights_grid=weights_grid, tau=tau,
        tokens=rollout.tokens[indices], prompts=prompts,
    )  # fmt: skip


def decoder_stage(run: PosttrainRun, rollout: Rollout, real_images: torch.Tensor, step: int) -> dict:
    """METHOD.md "Decoder stage": rank selection, one discriminator step, one decoder step (each
    skipped when its loss terms or gradient norm are not finite: the optimizers' guards); then the
    EMA decoder follows every `decoder_ema_every` steps, unless the decoder step was skipped.

    Forward passes run under the run's precision; decoded pixels, discriminator logits and every
    loss term are float32."""
    pcfg, models, optimizer = run.pcfg, run.models, run.optimizers["decoder"]
    selection = select_rollouts(rollout, real_images.shape[0], pcfg, step)
    real = to_model_range(real_images)
    disc_factor = adopt_weight(step, pcfg.disc_start)
    with autocast(run.device, run.precision.name):
        with torch.no_grad():
            real_codes = models.vq.encode_codes(real)
        # one decode of the real codes serves both steps: the discriminator step sees it detached
        recon = models.vq.decode_codes(real_codes)
    disc = discriminator_step(
        models.disc, run.optimizers["disc"], real, recon, step, run.accelerator, run.precision.name,
        started=disc_factor > 0, loss_weight=pcfg.disc_loss_weight,
    )  # fmt: skip
    with autocast(run.device, run.precision.name):
        loss, logged = decoder_loss(run, rollout, selection, real, recon, step, disc_factor)
    optimizer.zero_grad()
    run.accelerator.backward(loss)
    average_gradients(models.vq.decoder_parameters(), run.accelerator)
    grad_norm = clip_gradients(models.vq.decoder_parameters(), pcfg.grad_clip)
    stepped = optimizer.step(step + 1, {**logged, "decoder/grad_norm": grad_norm})
    logged = {
        **logged, **optimizer.guard.metrics(), **run.optimizers["disc"].guard.metrics(),
        "decoder/grad_norm": grad_norm, "decoder/tau": selection.tau,
        "decoder/weights_entropy": rank_weight_entropy(selection.weights_grid), "decoder/weights_max": selection.weights.max(),
        "disc/loss": disc.loss, "disc/logits_real": disc.logits_real, "disc/logits_fake": disc.logits_fake,
    }  # fmt: skip
    logged = {name: float(value.detach()) if torch.is_tensor(value) else value for name, value in logged.items()}
    if stepped and (step + 1) % pcfg.decoder_ema_every == 0:
        models.vq_ema.update(models.vq)
    return {**logged, "lr/decoder": optimizer.current_lr}


def decoder_weights(pcfg: PosttrainConfig, step: int, disc_factor: float) -> DecoderWeights:
    """The decoder objective's weights at `step`: the config's, lambda_c on its schedule (its span
    checked once, by `check_posttrain_config`)."""
    start, end = pcfg.consistency_span
    lambda_c = consistency_weight(
        step, pcfg.consistency_schedule, start, end, pcfg.consistency_start_weight, pcfg.consistency_weight
    )
    return DecoderWeights(
        recon=pcfg.recon_weight,
        perceptual=pcfg.perceptual_weight,
        rank_gan=pcfg.rank_gan_weight,
        disc_weight=pcfg.disc_weight,
        disc_factor=disc_factor,
        consistency=lambda_c,
        reward=pcfg.reward_backprop_weight,
        soft=pcfg.soft_token_weight,
    )


def decode_selected(decoder: torch.nn.Module, tokens: torch.Tensor, pcfg: PosttrainConfig) -> torch.Tensor:
    """The decode the rank-GAN, consistency and reward terms see: clamped to [-1, 1] with
    `clamp_decodes` (the release's detail)."""
    decoded = decoder.decode_codes(tokens)
    return decoded.clamp(-1.0, 1.0) if pcfg.clamp_decodes else decoded


def decoder_loss(
    run: PosttrainRun, rollout: Rollout | None, selection: RankSelection, real, recon, step: int, disc_factor: float
) -> tuple[torch.Tensor, dict]:
    """The decoder step's terms, weighted by `ranke.algo.decoder.decoder_objective` (METHOD.md):
    L_recon + L_rankgan + L_consist + L_reward (+ L_soft; the only term that reads `rollout`).
    The record holds each term (`decoder/<term>`) and each weighted part (`decoder/weighted/<part>`).
    The terms are built in a fixed order: the order of the graph is the order gradients sum in."""
    models, weights = run.models, decoder_weights(run.pcfg, step, disc_factor)
    pixel = reconstruction_loss(real, recon, kind=run.pcfg.recon_kind)
    perceptual_recon = models.perceptual(real, recon).mean()
    decoded = decode_selected(models.vq, selection.tokens, run.pcfg)
    generator, generator_weight, rank_gan = adversarial_terms(models, pixel, perceptual_recon, recon, decoded, selection, weights)
    recon_anchor = reconstruction_anchor_loss(
        pixel, perceptual_recon, generator, generator_weight,
        perceptual_weight=weights.perceptual, disc_weight=weights.disc_weight, disc_factor=weights.disc_factor,
    )  # fmt: skip
    with torch.no_grad():
        decoded_ema = decode_selected(models.vq_ema.module, selection.tokens, run.pcfg)
    terms = DecoderTerms(
        recon_anchor=recon_anchor,
        rank_gan=rank_gan,
        consistency=decoder_consistency_loss(models.perceptual, decoded, decoded_ema),
        reward=reward_term(run, decoded, selection),
        soft=soft_term(run, rollout, selection, decoded),
    )
    loss, parts = decoder_objective(terms, weights)
    return loss, {
        "decoder/loss": loss, "decoder/recon_anchor": recon_anchor, "decoder/pixel": pixel,
        "decoder/perceptual": perceptual_recon, "decoder/generator": generator, "decoder/generator_weight": generator_weight,
        "decoder/rank_gan": rank_gan, "decoder/consistency": terms.consistency, "decoder/consistency_weight": weights.consistency,
        "decoder/reward_backprop": terms.reward, "decoder/soft_token": terms.soft,
        **{f"decoder/weighted/{name}": part for name, part in parts.items()},
    }  # fmt: skip


def adversarial_terms(
    models: Models, pixel, perceptual_recon, recon, decoded, selection: RankSelection, weights: DecoderWeights
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(generator loss on the reconstruction, its adaptive weight, L_rankgan on the rank-selected
    decodes); zeros before the discriminator starts."""
    zero = torch.zeros((), device=recon.device)
    if weights.disc_factor <= 0:
        return zero, zero, zero
    generator = hinge_generator_loss(models.disc(recon).float())
    nll = pixel + weights.perceptual * perceptual_recon
    generator_weight = adaptive_generator_weight(nll, generator, models.vq.last_layer)
    return generator, generator_weight, rank_gan_loss(models.disc(decoded).float(), selection.weights)


def reward_term(run: PosttrainRun, decoded: torch.Tensor, selection: RankSelection) -> torch.Tensor:
    """L_reward on the online decodes, zero where the reward has no gradient."""
    reward_values = run.reward.differentiable_score(to_unit_range(decoded), selection.prompts)
    if reward_values is None:
        return torch.zeros((), device=decoded.device)
    return optional_reward_backprop_loss(reward_values, selection.weights.to(reward_values.device))


def soft_term(run: PosttrainRun, rollout: Rollout | None, selection: RankSelection, decoded: torch.Tensor) -> torch.Tensor:
    """L_soft, when its weight is on."""
    if run.pcfg.soft_token_weight <= 0:
        return torch.zeros((), device=decoded.device)
    soft_decoded = soft_decode(run.backbone, run.models.policy, run.models.vq, rollout, selection.indices, run.pcfg)
    return soft_token_consistency_loss(soft_decoded, decoded)


@torch.no_grad()
def soft_decode(backbone, policy, vq, rollout: Rollout, selected: torch.Tensor, pcfg: PosttrainConfig) -> torch.Tensor:
    """Decode of the soft codes of the selected rollouts (METHOD.md L_soft), with the gradient
    reaching only the decoder: the policy's teacher-forced conditional logits at the rollout's
    tokens (before guidance) are taken without gradient, from the policy as it is now or, with
    `soft_token_logits=rollout`, as recorded at rollout time; the codebook as decoded (unit) or raw."""
    if pcfg.soft_token_logits == "rollout":
        top_logits, top_indices = (values[selected] for values in rollout.soft_logits)
    else:
        tokens = rollout.tokens[selected]
        logits = backbone.token_logits(policy, rollout.text_emb[selected], rollout.text_mask[selected], tokens)
        top_logits, top_indices = logits.float().topk(min(pcfg.soft_token_top_k, logits.shape[-1]), dim=-1)
    codebook = vq.codebook_vectors() if pcfg.soft_token_codebook == "unit" else stored_codebook(vq)
    codes = soft_codes(top_logits, top_indices, codebook)  # [b, N, d]
    side = int(round(math.sqrt(codes.shape[1])))
    with torch.enable_grad():
        return vq.decode(codes.transpose(1, 2).reshape(codes.shape[0], codes.shape[2], side, side))


def stored_codebook(vq) -> torch.Tensor:
    """The codebook's stored vectors, before the l2 normalisation decoding applies (LlamaGen's
    `VQModel` and transformers' `JanusVQVAE` both keep them in `quantize.embedding`)."""
    quantize = vq.quantize if hasattr(vq, "quantize") else vq.vq.quantize
    return quantize.embedding.weight


@torch.no_grad()
def sample_grid(run: PosttrainRun, prompts: list[str]) -> torch.Tensor:
    """The fixed preview: the online policy's samples for `prompts` (the run's seed), decoded by the
    EMA decoder (first rows) and, when the decoder trains, by the online decoder (last rows)."""
    backbone, models = run.backbone, run.models
    generator = torch.Generator(backbone.device).manual_seed(run.cfg.seed)
    text_emb, text_mask = backbone.encode_prompts(prompts)
    tokens = backbone.sample(text_emb, text_mask, run.cfg.sampling, generator, policy=models.policy).tokens
    decoders = [models.vq_ema.module] + ([models.vq] if run.pcfg.trains_decoder else [])
    return torch.cat([backbone.decode(tokens, decoder=decoder) for decoder in decoders]).cpu()


def start_posttrain(
    config: str | RunConfig, out_dir: str, overrides: list[str], resume: bool, objects: UserObjects | None = None
) -> tuple[PosttrainRun, int]:
    """Resolve the config (a preset, a YAML file or a `RunConfig`), build the models, restore a
    checkpoint with `resume`; returns the run and the step to start from. `objects`: the rewards,
    prompts and backbone given from Python (`ranke.api`), as the config's `objects` section records
    them. One process or several under `accelerate launch` / `torchrun`."""
    objects = objects or UserObjects()

    def check(cfg: RunConfig) -> None:
        objects.require(cfg.objects)
        check_posttrain_config(cfg.posttrain)

    start = begin_run(config, out_dir, overrides, "posttrain", resume, check=check, ddp_buckets=True)
    pcfg, device = start.cfg.posttrain, start.device
    if pcfg.deterministic:
        set_deterministic(True)
    models, backbone, cfg = build_models(start.cfg, device, objects.backbone)
    reward = build_posttrain_reward(pcfg, device, objects.rewards)
    probe_user_rewards(reward, backbone.image_size, device)  # a broken user reward stops before config.yaml
    data_rng = np.random.default_rng(cfg.seed)
    prompt_source = build_prompt_source(cfg, backbone.image_size, data_rng, objects.prompts)  # as do bad prompts
    if start.main_process:
        write_run_config(cfg, start.run_dir)
    if start.resumed is not None:
        models.load_weights(start.resumed[0])
    policy_for_loss, sharding = distribute_policy(models, start)
    if start.accelerator.num_processes > 1:
        reward.reduce_sum = lambda sums: start.accelerator.reduce(sums, reduction="sum")
    run = PosttrainRun(
        cfg=cfg, run_dir=start.run_dir, backbone=backbone, models=models,
        optimizers=build_optimizers(models, pcfg, cfg.max_consecutive_skips, device),  # after sharding: FSDP replaces the parameters
        policy_for_loss=policy_for_loss, reward=reward,
        prompt_source=prompt_source,
        generators={"data": data_rng, "rollout": torch.Generator(device).manual_seed(cfg.seed)},
        accelerator=start.accelerator, shard=Shard.of(start.accelerator, pcfg.prompts_per_step),
        precision=start.precision, sharding=sharding,
    )  # fmt: skip
    start_step = 0 if start.resumed is None else restore_posttrain_state(run, start.resumed[1])
    return run, start_step


def distribute_policy(models: Models, start: RunStart) -> tuple[torch.nn.Module, str]:
    """Gradient checkpointing where asked, then the policy spread over the processes when it trains:
    sharded (FSDP) or replicated (DDP). Returns the policy the GRPO loss runs and the sharding."""
    pcfg, accelerator = start.cfg.posttrain, start.accelerator
    if pcfg.policy_grad_checkpointing:
        models.policy.enable_gradient_checkpointing()
    if pcfg.decoder_grad_checkpointing:
        models.vq.enable_gradient_checkpointing()
    sharding = "fsdp" if uses_fsdp(accelerator, pcfg.policy_sharding) else "ddp"
    if not pcfg.trains_policy:
        return models.policy, sharding
    if sharding == "fsdp":
        shard_policy(models.policy, bf16_communication=start.precision.name == "bf16" and start.device.type == "cuda")
        return models.policy, sharding
    return accelerator.prepare(models.policy), sharding  # DDP: gradients averaged over processes


def posttrain_state(run: PosttrainRun, step: int) -> dict:
    """The trainer state after `step` (`ranke.train.trainer_state`; a collective when the policy is
    sharded), with the policy's sharding, the reward's running statistics and the prompt source's state."""
    return trainer_state(
        step, run.optimizers, run.generators, policy_sharding=run.sharding, reward_stats=run.reward.state_dict(),
        data=run.prompt_source.state_dict(),
    )  # fmt: skip


def restore_posttrain_state(run: PosttrainRun, saved: dict) -> int:
    """Load a checkpoint's trainer state (after sharding), with the configured learning rates;
    returns the step to continue from."""
    saved = upgrade(saved, "posttrain")
    saved_sharding = saved.get("policy_sharding", "ddp")
    if saved_sharding != run.sharding:
        raise UserError(
            f"the checkpoint was written with policy_sharding={saved_sharding}; resume it with the same setting"
        )
    restore_trainer_state(saved, run.optimizers, run.generators)
    run.reward.load_state_dict(saved["reward_stats"])
    run.prompt_source.load_state_dict(saved["data"])
    return saved["step"]


@dataclass
class RunOutputs:
    """What the bookkeeping stage writes to: the main process's logs, previews and evaluator."""

    logger: RunLogger  # metrics.jsonl and the trackers (main process only)
    evaluations: MetricsWriter
    evaluator: Evaluator | None  # the toy judges; real backbones are evaluated with `ranke eval` on checkpoints
    grid_prompts: list[str] | None  # fixed preview prompts (toy world); None: each step's first prompts
    start_step: int  # where this process started (0, or the resumed checkpoint's step)
    started: float  # perf_counter() at that start: the pace of the plain progress lines


def open_outputs(run: PosttrainRun, start_step: int) -> RunOutputs:
    """The run's logs (records after `start_step` dropped: a resume redoes them), preview prompts and evaluator."""
    cfg, pcfg, main_process = run.cfg, run.pcfg, run.accelerator.is_main_process
    toy_world = cfg.backbone.kind == "toy"
    grid_prompts = heldout_prompts(cfg.toy)[: pcfg.grid_prompts] if toy_world else None
    evaluator = None
    if pcfg.eval_samples and main_process and toy_world:
        from ranke.eval.evaluate import Evaluator

        decoder = run.models.vq_ema.module
        evaluator = Evaluator(
            cfg, run.device, n=pcfg.eval_samples, seed=pcfg.eval_seed, tokenizer=decoder, split=pcfg.eval_split
        )
    logger = RunLogger(run.run_dir, cfg.log_with, cfg, run.device, start_step)
    evaluations = MetricsWriter(run.run_dir / "eval.jsonl")
    if main_process:
        evaluations.drop_after(start_step)
    return RunOutputs(
        logger=logger, evaluations=evaluations, evaluator=evaluator, grid_prompts=grid_prompts, start_step=start_step,
        started=time.perf_counter(),
    )  # fmt: skip


def bookkeeping(run: PosttrainRun, outputs: RunOutputs, bar, step: int, record: dict, prompts: list[str]) -> bool:
    """After a step: the record averaged over processes (replicas checked when asked) to
    the run log, the preview grid, the evaluation, the checkpoint, a barrier. Returns whether
    it wrote a checkpoint."""
    pcfg, models, main_process = run.pcfg, run.models, run.accelerator.is_main_process
    record = mean_over_processes(record, run.accelerator)
    if pcfg.check_replicas_every and (step + 1) % pcfg.check_replicas_every == 0:
        check_replicas({"policy": models.policy, "decoder": models.vq}, run.accelerator, step + 1)
    grid_due = due(step + 1, pcfg.grid_every, pcfg.steps)
    eval_due = outputs.evaluator is not None and due(step + 1, pcfg.eval_every, pcfg.steps)
    save_due = due(step + 1, pcfg.save_every, pcfg.steps)
    if main_process:
        if due(step + 1, pcfg.log_every, pcfg.steps):
            outputs.logger.log({**record, "precision/bf16": int(run.precision.name == "bf16")})  # numeric, as trackers take
        show_progress(run, outputs, bar, step, record)
    # whole weights and checkpoint states are collectives with a sharded policy: every process joins
    if grid_due or eval_due:
        with whole_weights(models.policy), autocast(run.device, run.precision.name):
            if main_process and grid_due:
                shown = outputs.grid_prompts or prompts[: pcfg.grid_prompts]  # real data: this step's first prompts
                save_image_grid(sample_grid(run, shown), run.run_dir / f"samples_{step + 1:06d}.png", nrow=len(shown))
            if main_process and eval_due:
                evaluate_step(outputs.evaluator, run, step + 1, outputs.evaluations)
    if save_due:
        save_posttrain_checkpoint(run, step + 1)
    run.accelerator.wait_for_everyone()
    return save_due


def show_progress(run: PosttrainRun, outputs: RunOutputs, bar, step: int, record: dict) -> None:
    """The raw reward scores (not the normalised total) and the KL on the bar, or one plain line
    per step in a worker's log file."""
    scores = {
        key[len("reward/") : -len("_mean")]: f"{value:.2f}"
        for key, value in record.items()
        if key.startswith("reward/") and key.endswith("_mean")
    }
    scores |= {"kl": f"{record.get('policy/kl', 0.0):.4f}"}
    bar.set_postfix(scores)
    if progress_bars_off():
        pace = (time.perf_counter() - outputs.started) / (step + 1 - outputs.start_step)
        print(progress_line(f"posttrain[{run.pcfg.mode}]", step + 1, run.pcfg.steps, pace, scores), flush=True)


def save_posttrain_checkpoint(run: PosttrainRun, step: int) -> None:
    """Checkpoint `step`: every process gathers (a collective with a sharded policy), the main one writes."""
    tensors, state = run.models.checkpoint_tensors(), posttrain_state(run, step)
    keep_last = run.pcfg.keep_checkpoints or None
    save_recipe_checkpoint(run.accelerator.is_main_process, run.run_dir, step, tensors, state, keep_last)


def posttrain_step(run: PosttrainRun, outputs: RunOutputs, step: int, bar) -> bool:
    """One step (module docstring): rollout, policy stage, decoder stage, bookkeeping; returns
    whether it wrote a checkpoint."""
    pcfg, timings = run.pcfg, {}
    with timed(timings, "step"):
        prompts, real_images = next_prompts(run)
        rollout = step_rollout(run, prompts, real_images, timings)
        record = {"step": step + 1, **reward_statistics(rollout, pcfg.group_size)}
        if pcfg.dynamic_sampling_draws:
            with timed(timings, "refill"):
                rollout, real_images, sampled = refill_groups(run, rollout, real_images)
            record.update(sampled)
        if pcfg.trains_policy:
            with timed(timings, "update"):
                record.update(policy_stage(run, rollout, step))
        if pcfg.trains_decoder:
            with timed(timings, "decoder"):
                record.update(decoder_stage(run, rollout, real_images, step))
    record.update({f"time/{name}": round(seconds, 4) for name, seconds in timings.items()})
    return bookkeeping(run, outputs, bar, step, record, prompts)


def train_posttrain(
    config: str | RunConfig, out_dir: str, overrides: list[str] = (), resume: bool = False, objects: UserObjects | None = None
) -> dict:
    """Run (or with `resume`, continue) a post-training run in `out_dir`, with the objects given
    from Python (`start_posttrain`); one process or several under `accelerate launch` / `torchrun`
    (data parallel over the step's prompts)."""
    run, start_step = start_posttrain(config, out_dir, overrides, resume, objects)
    outputs = open_outputs(run, start_step)
    run_steps(
        f"posttrain[{run.pcfg.mode}]", start_step, run.pcfg.steps, run.cfg.stop_signals, run.run_dir, run.accelerator,
        outputs.logger, one_step=partial(posttrain_step, run, outputs), save=partial(save_posttrain_checkpoint, run),
    )  # fmt: skip
    final = checkpoint_lib.latest_checkpoint(run.run_dir)
    if run.accelerator.is_main_process:
        print(f"posttrain: {run.pcfg.steps} steps (mode={run.pcfg.mode}) -> {final}")
    return {"checkpoint": str(final), "steps": run.pcfg.steps}


def evaluate_step(evaluator: Evaluator, run: PosttrainRun, step: int, writer: MetricsWriter) -> None:
    """Held-out metrics of the online policy with the EMA decoder and, when the decoder trains,
    the online decoder (`mode=policy` leaves both equal to the base decoder), one record each,
    with the precision they were sampled in; the first 32 evaluation images go to
    `eval_samples_<step>_<decoder>.png` in the run."""
    models, trains_decoder = run.models, run.pcfg.trains_decoder
    decoders = {"ema": models.vq_ema.module, **({"online": models.vq} if trains_decoder else {})}
    for name, decoder in decoders.items():
        result = evaluator(run.backbone, policy=models.policy, decoder=decoder, preview=32)
        label = name if trains_decoder else "base"
        writer.write({"step": step, "policy": "online", "decoder": label, **result, **run.precision.as_record()})
        save_image_grid(evaluator.preview, writer.path.parent / f"eval_samples_{step:06d}_{label}.png", nrow=8)
