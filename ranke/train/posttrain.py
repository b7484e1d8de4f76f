"""Recipe: post-training with GRPO (policy stage) and RankE's decoder stage (METHOD.md section 3).

    ranke posttrain --config configs/toy.yaml --out runs/rank_e [mode=policy|decoder|both] [key=value ...]

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

Written on accelerate (single process by default; several processes split the prompts, with the
policy in DDP or sharded by FSDP, `ranke.parallel`); `precision=bf16` runs the forward passes under
autocast. Every `log_every` steps a record goes to the run log (`metrics.jsonl` plus TensorBoard or
Weights & Biases, `ranke.train.logging.RunLogger`); checkpoints are atomic (`ranke.checkpoint`)
and `--resume` continues bit-exactly. A stop signal (`stop_signals`) ends the run after the current
step with its checkpoint (`ranke.train.preemption`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ranke import checkpoint as checkpoint_lib
from ranke.algo.decoder import (
    CONSISTENCY_SCHEDULES,
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
from ranke.algo.grpo import KL_ANCHORS, group_advantages, grpo_policy_loss
from ranke.algo.vqgan import (
    adaptive_generator_weight,
    adopt_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    reconstruction_loss,
)
from ranke.backbones import Backbone, load_configured_backbone
from ranke.config import PosttrainConfig, RunConfig
from ranke.data import read_prompts
from ranke.images import save_image_grid
from ranke.models.discriminator import PatchDiscriminator
from ranke.models.perceptual import build_perceptual
from ranke.models.vq import to_model_range, to_unit_range
from ranke.parallel import (
    Shard,
    average_gradients,
    check_replicas,
    clip_gradients,
    full_state_dict,
    load_optimizer_state_dict,
    mean_over_processes,
    optimizer_state_dict,
    process_group_kwargs,
    recipe_precision,
    shard_policy,
    uses_fsdp,
    whole_weights,
)
from ranke.rewards.build import build_posttrain_reward
from ranke.rewards.combine import CombinedReward
from ranke.precision import PrecisionChoice
from ranke.runtime import UserError, autocast, progress, progress_bars_off, progress_line, set_deterministic
from ranke.toy.data import heldout_prompts, render_caption, scene_for_caption, train_batch
from ranke.train import state as state_lib
from ranke.train.guard import StepGuard, gradient_norm, guarded_step
from ranke.train.logging import MetricsWriter, RunLogger, start_run, write_run_config
from ranke.train.preemption import Preemption
from ranke.train.resume import resume_point, set_learning_rate

MODES = ("policy", "decoder", "both")
REFERENCES = ("frozen", "ema")
SOFT_TOKEN_LOGITS = ("current", "rollout")
SOFT_TOKEN_CODEBOOKS = ("unit", "raw")


def check_posttrain_config(pcfg: PosttrainConfig) -> None:
    """One clear line for settings the loop cannot run with (beyond each number's own range,
    `ranke.domains`, checked when the config is built)."""
    if pcfg.mode not in MODES:
        raise UserError(f"unknown mode '{pcfg.mode}' (one of: {', '.join(MODES)})")
    if not 1 <= pcfg.rank_top_k <= pcfg.group_size:
        raise UserError(f"rank_top_k={pcfg.rank_top_k} must be between 1 and group_size={pcfg.group_size}")
    if pcfg.reference not in REFERENCES:
        raise UserError(f"unknown reference '{pcfg.reference}' (one of: {', '.join(REFERENCES)})")
    if pcfg.kl_kind not in KL_ANCHORS:
        raise UserError(f"unknown kl_kind '{pcfg.kl_kind}' (one of: {', '.join(KL_ANCHORS)})")
    if pcfg.soft_token_logits not in SOFT_TOKEN_LOGITS or pcfg.soft_token_codebook not in SOFT_TOKEN_CODEBOOKS:
        raise UserError(
            f"soft_token_logits must be one of {', '.join(SOFT_TOKEN_LOGITS)} and soft_token_codebook one of "
            f"{', '.join(SOFT_TOKEN_CODEBOOKS)}"
        )
    check_consistency_schedule(pcfg)


def consistency_span(pcfg: PosttrainConfig) -> tuple[int, int]:
    """The steps over which a linear / cosine lambda_c ramps: `consistency_start_step` to
    `consistency_end_step`, which defaults to a quarter of `steps`."""
    end = pcfg.steps // 4 if pcfg.consistency_end_step is None else pcfg.consistency_end_step
    return pcfg.consistency_start_step, end


def check_consistency_schedule(pcfg: PosttrainConfig) -> None:
    """One line naming the key when the lambda_c schedule cannot ramp as asked (each weight's and
    step's own range is `ranke.domains`')."""
    if pcfg.consistency_schedule not in CONSISTENCY_SCHEDULES:
        choices = ", ".join(CONSISTENCY_SCHEDULES)
        raise UserError(f"posttrain.consistency_schedule='{pcfg.consistency_schedule}' is not one of: {choices}")
    if pcfg.consistency_schedule == "none":
        return
    start, end = consistency_span(pcfg)
    if end > pcfg.steps:
        raise UserError(f"posttrain.consistency_end_step={end} must be <= steps={pcfg.steps}")
    if start >= end:
        raise UserError(
            f"posttrain.consistency_start_step={start} must be below consistency_end_step={end} "
            f"(the end of the ramp; by default steps // 4)"
        )


class ToyPromptSource:
    """B (prompt, real image) pairs per step: the seeded toy training stream, or prompts drawn
    from a toy-grammar prompt file with a freshly rendered real image for each. Its only state
    is the loop's generator."""

    def __init__(self, cfg: RunConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        self.prompts = read_prompts(cfg.posttrain.prompts) if cfg.posttrain.prompts else None
        if self.prompts:
            for prompt in self.prompts:  # a scene for each prompt, so a bad one fails now, not mid-run
                try:
                    scene_for_caption(prompt, np.random.default_rng(0))
                except ValueError as err:
                    raise UserError(f"prompt file '{cfg.posttrain.prompts}': {err}") from None

    def next_batch(self, batch_size: int) -> tuple[list[str], torch.Tensor]:
        """(prompts, real images float [B, 3, H, W] in [0, 1])."""
        if self.prompts is None:
            images, captions, _ = train_batch(self.rng, batch_size, self.cfg.toy)
            return captions, images
        picked = [self.prompts[i] for i in self.rng.integers(len(self.prompts), size=batch_size)]
        pixels = np.stack([render_caption(prompt, self.rng, self.cfg.toy) for prompt in picked])
        return picked, torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_prompt_source(cfg: RunConfig, image_size: int, rng: np.random.Generator):
    """`posttrain.data` (image-caption folder or tar shards, `ranke.data`), else the toy world."""
    pcfg = cfg.posttrain
    if pcfg.data and pcfg.prompts:
        raise UserError("set either posttrain.data (image-caption data) or posttrain.prompts (toy prompts), not both")
    if pcfg.data:
        from ranke.data import ImageCaptionSource

        return ImageCaptionSource(pcfg.data, image_size, rng)
    if cfg.backbone.kind != "toy":
        raise UserError(f"backbone.kind={cfg.backbone.kind} needs posttrain.data (image-caption folder or .tar shards)")
    return ToyPromptSource(cfg, rng)


@dataclass
class Rollout:
    """G rollouts for each of B prompts, groups contiguous (prompt-major)."""

    prompts: list[str]  # B*G
    text_emb: torch.Tensor  # [B*G, T, C]
    text_mask: torch.Tensor  # [B*G, T]
    tokens: torch.Tensor  # [B*G, N]
    logp_old: torch.Tensor  # [B*G, N]
    logp_ref: torch.Tensor  # [B*G, N]
    images: torch.Tensor  # [B*G, 3, H, W] in [0, 1], decoded by the EMA decoder
    reward: torch.Tensor  # [B*G] combined, normalised reward
    components: dict[str, torch.Tensor]  # raw score of each reward [B*G]
    nonfinite: dict[str, int]  # non-finite raw scores of each reward (counted as 0 in `reward`)
    soft_logits: tuple[torch.Tensor, torch.Tensor] | None = None  # top-k (logits, codes) [B*G, N, k] at rollout time


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

    cfg: RunConfig
    run_dir: Path
    backbone: Backbone
    models: Models
    optimizers: Optimizers
    policy_for_loss: torch.nn.Module  # the policy whose forward the GRPO loss runs (DDP-wrapped unless sharded)
    reward: CombinedReward
    prompt_source: object  # ToyPromptSource or ranke.data.ImageCaptionSource
    generators: dict  # the run's random streams ("data": numpy, "rollout": torch), checkpointed
    accelerator: object
    shard: Shard  # this process's share of every step's prompts
    precision: PrecisionChoice  # the forward passes' precision (ranke.precision) and why
    sharding: str  # how the policy is spread over processes: ddp | fsdp
    guards: dict[str, StepGuard]  # the non-finite step guard of each optimizer, by its name

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
    with timed(timings, "logprobs"), autocast(backbone.device, run.precision.name):
        logp_ref = backbone.token_logprobs(models.reference, text_emb, text_mask, sample.tokens)
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


def policy_stage(run: PosttrainRun, rollout: Rollout, step: int) -> dict:
    """METHOD.md "Policy stage": `grpo_epochs` passes of clipped GRPO with the KL anchor on the
    group-relative advantages, each one optimizer step over all rollouts (micro-batched
    forward/backward), skipped when its loss or gradient norm is not finite (`run.guards`); then
    the EMA policy follows every `policy_ema_every` steps, unless no pass updated the policy."""
    pcfg, models, optimizer, guard = run.pcfg, run.models, run.optimizers.policy, run.guards["policy"]
    # the release's ablation: every rollout reinforced alike, the ranking ignored
    advantages = torch.ones_like(rollout.reward) if pcfg.uniform_advantages else group_advantages(rollout.reward, pcfg.group_size)
    count = rollout.tokens.shape[0]
    micro = pcfg.micro_batch_size or count
    totals: dict[str, float] = {}
    stepped = False
    for _ in range(pcfg.grpo_epochs):
        optimizer.zero_grad(set_to_none=True)
        epoch_loss = 0.0
        for start in range(0, count, micro):
            part = slice(start, start + micro)
            share = (min(start + micro, count) - start) / count
            with autocast(run.backbone.device, run.precision.name):
                logp_new, entropy = run.backbone.token_logprobs(
                    run.policy_for_loss, rollout.text_emb[part], rollout.text_mask[part], rollout.tokens[part],
                    return_entropy=True,
                )  # fmt: skip
            loss, stats = grpo_policy_loss(
                logp_new,
                rollout.logp_old[part],
                rollout.logp_ref[part],
                advantages[part],
                clip_eps=pcfg.clip_eps,
                beta=pcfg.kl_coef,
                kl_kind=pcfg.kl_kind,
            )
            run.accelerator.backward(loss * share)
            epoch_loss += float(loss.detach()) * share
            stats = {**stats, "loss": loss.detach(), "entropy": entropy.detach().mean()}
            for name, value in stats.items():
                totals[name] = totals.get(name, 0.0) + float(value) * share / pcfg.grpo_epochs
        totals["grad_norm"] = clip_gradients(run.policy_for_loss.parameters(), pcfg.grad_clip)
        checked = {"policy/loss": epoch_loss, "policy/grad_norm": totals["grad_norm"]}
        stepped = guarded_step(guard, optimizer, step + 1, checked) or stepped
    if stepped and (step + 1) % pcfg.policy_ema_every == 0:
        models.policy_ema.update(models.policy)
    return {
        **{f"policy/{name}": value for name, value in totals.items()}, **guard.metrics(),
        "lr/policy": optimizer.param_groups[0]["lr"],
    }  # fmt: skip


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
    grouped = rollout.reward.view(batch, pcfg.group_size)
    top = select_top_k(grouped, pcfg.rank_top_k)  # [B, k]
    tau = cosine_tau(step, pcfg.steps, pcfg.tau_start, pcfg.tau_end, pcfg.tau_anneal_ratio)
    weights_grid = rank_weights(grouped.gather(1, top), tau, uniform=pcfg.uniform_weights)
    indices = (top + torch.arange(batch, device=top.device)[:, None] * pcfg.group_size).flatten()
    prompts = [rollout.prompts[i] for i in indices.tolist()]
    return RankSelection(indices, weights_grid.flatten(), weights_grid, tau, rollout.tokens[indices], prompts)


def discriminator_step(
    run: PosttrainRun, real: torch.Tensor, recon: torch.Tensor, disc_factor: float, step: int
) -> dict:
    """One hinge step of the discriminator on real images vs reconstructions of their codes
    (none before `disc_start`; skipped when not finite); the discriminator is left frozen for the
    decoder step."""
    disc, zero = run.models.disc, torch.zeros((), device=real.device)
    disc_loss, logits_real, logits_fake = zero, zero, zero
    if disc_factor > 0:
        disc.requires_grad_(True)
        with autocast(run.backbone.device, run.precision.name):
            logits_real, logits_fake = disc(real).float(), disc(recon.detach()).float()
        disc_loss = run.pcfg.disc_loss_weight * hinge_discriminator_loss(logits_real, logits_fake)
        run.optimizers.disc.zero_grad(set_to_none=True)
        run.accelerator.backward(disc_loss)
        average_gradients(disc.parameters(), run.accelerator)
        checked = {"disc/loss": disc_loss, "disc/grad_norm": gradient_norm(disc.parameters())}
        guarded_step(run.guards["disc"], run.optimizers.disc, step + 1, checked)
    disc.requires_grad_(False)
    return {"disc/loss": disc_loss, "disc/logits_real": logits_real.mean(), "disc/logits_fake": logits_fake.mean()}


def decoder_stage(run: PosttrainRun, rollout: Rollout, real_images: torch.Tensor, step: int) -> dict:
    """METHOD.md "Decoder stage": rank selection, one discriminator step, one decoder step (each
    skipped when its loss terms or gradient norm are not finite, `run.guards`); then the EMA
    decoder follows every `decoder_ema_every` steps, unless the decoder step was skipped.

    Forward passes run under the run's precision; decoded pixels, discriminator logits and every
    loss term are float32."""
    pcfg, models, optimizer = run.pcfg, run.models, run.optimizers.decoder
    selection = select_rollouts(rollout, real_images.shape[0], pcfg, step)
    real = to_model_range(real_images)
    disc_factor = adopt_weight(step, pcfg.disc_start)
    with autocast(run.backbone.device, run.precision.name):
        with torch.no_grad():
            real_codes = models.vq.encode_codes(real)
        # one decode of the real codes serves both steps: the discriminator step sees it detached
        recon = models.vq.decode_codes(real_codes)
    disc_logged = discriminator_step(run, real, recon, disc_factor, step)
    with autocast(run.backbone.device, run.precision.name):
        loss, logged = decoder_loss(run, rollout, selection, real, recon, step, disc_factor)
    optimizer.zero_grad(set_to_none=True)
    run.accelerator.backward(loss)
    average_gradients(models.vq.decoder_parameters(), run.accelerator)
    grad_norm = clip_gradients(models.vq.decoder_parameters(), pcfg.grad_clip)
    stepped = guarded_step(run.guards["decoder"], optimizer, step + 1, {**logged, "decoder/grad_norm": grad_norm})
    logged = {
        **logged,
        **run.guards["decoder"].metrics(),
        **run.guards["disc"].metrics(),
        "decoder/grad_norm": grad_norm,
        "decoder/tau": selection.tau,
        "decoder/weights_entropy": rank_weight_entropy(selection.weights_grid),
        "decoder/weights_max": selection.weights.max(),
        **disc_logged,
    }
    logged = {name: float(value.detach()) if torch.is_tensor(value) else value for name, value in logged.items()}
    if stepped and (step + 1) % pcfg.decoder_ema_every == 0:
        models.vq_ema.update(models.vq)
    return {**logged, "lr/decoder": optimizer.param_groups[0]["lr"]}


def decoder_weights(pcfg: PosttrainConfig, step: int, disc_factor: float) -> DecoderWeights:
    """The decoder objective's weights at `step`: the config's, lambda_c on its schedule."""
    start, end = consistency_span(pcfg)
    lambda_c = consistency_weight(
        step, pcfg.consistency_schedule, start, end, pcfg.consistency_start_weight, pcfg.consistency_weight
    )
    return DecoderWeights(
        recon=pcfg.recon_weight,
        rank_gan=pcfg.rank_gan_weight,
        disc_weight=pcfg.disc_weight,
        disc_factor=disc_factor,
        consistency=lambda_c,
        reward=pcfg.reward_backprop_weight,
        soft=pcfg.soft_token_weight,
    )


def decoder_loss(
    run: PosttrainRun, rollout: Rollout | None, selection: RankSelection, real, recon, step: int, disc_factor: float
) -> tuple[torch.Tensor, dict]:
    """The decoder step's terms, weighted by `ranke.algo.decoder.decoder_objective` (METHOD.md):
    L_recon + L_rankgan + L_consist + L_reward (+ L_soft; the only term that reads `rollout`)."""
    pcfg, models = run.pcfg, run.models
    vq, vq_ema, disc, perceptual = models.vq, models.vq_ema.module, models.disc, models.perceptual
    zero = torch.zeros((), device=real.device)
    pixel = reconstruction_loss(real, recon, kind=pcfg.recon_kind)
    perceptual_recon = perceptual(real, recon).mean()
    generator, generator_weight, rank_gan = zero, zero, zero
    decoded = vq.decode_codes(selection.tokens)
    if pcfg.clamp_decodes:
        decoded = decoded.clamp(-1.0, 1.0)
    if disc_factor > 0:
        generator = hinge_generator_loss(disc(recon).float())
        generator_weight = adaptive_generator_weight(
            pixel + pcfg.perceptual_weight * perceptual_recon, generator, vq.last_layer
        )
        rank_gan = rank_gan_loss(disc(decoded).float(), selection.weights)
    recon_anchor = reconstruction_anchor_loss(
        pixel, perceptual_recon, generator, generator_weight, pcfg.perceptual_weight, pcfg.disc_weight, disc_factor
    )
    with torch.no_grad():
        decoded_ema = vq_ema.decode_codes(selection.tokens)
        if pcfg.clamp_decodes:
            decoded_ema = decoded_ema.clamp(-1.0, 1.0)
    consistency = decoder_consistency_loss(perceptual, decoded, decoded_ema)
    reward_values = run.reward.differentiable_score(to_unit_range(decoded), selection.prompts)
    reward_term = (
        zero
        if reward_values is None
        else optional_reward_backprop_loss(reward_values, selection.weights.to(reward_values.device))
    )
    soft = zero
    if pcfg.soft_token_weight > 0:
        soft_decoded = soft_decode(run.backbone, models.policy, vq, rollout, selection.indices, pcfg)
        soft = soft_token_consistency_loss(soft_decoded, decoded)

    weights = decoder_weights(pcfg, step, disc_factor)
    terms = DecoderTerms(recon_anchor, rank_gan, consistency, reward_term, soft)
    loss, _ = decoder_objective(terms, weights)
    return loss, {
        "decoder/loss": loss,
        "decoder/recon_anchor": recon_anchor,
        "decoder/pixel": pixel,
        "decoder/perceptual": perceptual_recon,
        "decoder/generator": generator,
        "decoder/generator_weight": generator_weight,
        "decoder/rank_gan": rank_gan,
        "decoder/consistency": consistency,
        "decoder/consistency_weight": weights.consistency,
        "decoder/reward_backprop": reward_term,
        "decoder/soft_token": soft,
    }


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


@dataclass
class Models:
    policy: torch.nn.Module
    policy_ema: state_lib.EMA
    reference: torch.nn.Module
    vq: torch.nn.Module
    vq_ema: state_lib.EMA
    disc: torch.nn.Module | None
    perceptual: torch.nn.Module | None


@dataclass
class Optimizers:
    policy: torch.optim.Optimizer | None
    decoder: torch.optim.Optimizer | None
    disc: torch.optim.Optimizer | None

    def present(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers this mode uses, by name."""
        named = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {name: optimizer for name, optimizer in named.items() if optimizer is not None}


def build_models(cfg: RunConfig, device: torch.device) -> tuple[Models, Backbone, RunConfig]:
    """The starting policy and tokenizer (`cfg.backbone`), their EMA copies, the reference and the
    decoder-stage networks; returns the config updated with the models' own arguments."""
    pcfg = cfg.posttrain
    backbone, cfg = load_configured_backbone(cfg, device)
    policy = backbone.policy.float().requires_grad_(pcfg.mode != "decoder")
    vq = backbone.tokenizer.float().requires_grad_(False)
    if pcfg.mode != "policy":
        for parameter in vq.decoder_parameters():
            parameter.requires_grad_(True)
    policy_ema = state_lib.EMA(policy, pcfg.policy_ema_decay)
    reference = copy.deepcopy(policy).requires_grad_(False) if pcfg.reference == "frozen" else policy_ema.module
    disc = perceptual = None
    if pcfg.mode != "policy":
        disc = PatchDiscriminator(base_channels=pcfg.disc_channels, n_layers=pcfg.disc_layers).to(device)
        perceptual = build_perceptual(pcfg.perceptual, pcfg.vgg_path, pcfg.lpips_lin_path).to(device)
    models = Models(policy, policy_ema, reference, vq, state_lib.EMA(vq, pcfg.decoder_ema_decay), disc, perceptual)
    return models, backbone, cfg


def build_optimizers(models: Models, pcfg: PosttrainConfig) -> Optimizers:
    policy_opt = decoder_opt = disc_opt = None
    if pcfg.mode != "decoder":
        policy_opt = torch.optim.AdamW(
            models.policy.parameters(), lr=pcfg.policy_lr, weight_decay=pcfg.policy_weight_decay
        )
    if pcfg.mode != "policy":
        decoder_opt = torch.optim.AdamW(
            models.vq.decoder_parameters(), lr=pcfg.decoder_lr, weight_decay=pcfg.decoder_weight_decay
        )
        disc_opt = torch.optim.AdamW(
            models.disc.parameters(), lr=pcfg.disc_lr, betas=tuple(pcfg.disc_betas), weight_decay=pcfg.disc_weight_decay
        )
    return Optimizers(policy_opt, decoder_opt, disc_opt)


def checkpoint_tensors(models: Models) -> dict[str, dict[str, torch.Tensor]]:
    """Every model's whole weights (a collective when the policy is sharded: call on all processes)."""
    tensors = {
        "policy": full_state_dict(models.policy),
        "policy_ema": models.policy_ema.state_dict(),
        "vq": models.vq.state_dict(),
        "vq_ema": models.vq_ema.state_dict(),
    }
    if models.disc is not None:
        tensors["discriminator"] = models.disc.state_dict()
    return tensors


def restore_weights(models: Models, tensors: dict) -> None:
    """Load a checkpoint's weights (before the policy is sharded)."""
    models.policy.load_state_dict(tensors["policy"])
    models.policy_ema.module.load_state_dict(tensors["policy_ema"])
    models.vq.load_state_dict(tensors["vq"])
    models.vq_ema.module.load_state_dict(tensors["vq_ema"])
    if models.disc is not None:
        if "discriminator" not in tensors:
            raise UserError("the checkpoint has no discriminator: it was written by a mode=policy run")
        models.disc.load_state_dict(tensors["discriminator"])


def trainer_state_of(run: PosttrainRun, step: int) -> dict:
    """Everything but the weights that resuming needs (a collective when the policy is sharded)."""
    models = run.models
    states = {
        name: optimizer_state_dict(models.policy, optimizer) if name == "policy" else optimizer.state_dict()
        for name, optimizer in run.optimizers.present().items()
    }
    return {
        "step": step,
        "optimizers": states,
        "policy_sharding": run.sharding,
        "reward_stats": run.reward.state_dict(),
        "rng": state_lib.rng_state(run.generators),
        "data": run.prompt_source.state_dict(),
        "guards": {name: guard.state_dict() for name, guard in run.guards.items()},
    }


def restore_trainer_state(run: PosttrainRun, trainer_state: dict) -> int:
    """Load optimizer, reward, RNG, data and skip-count state (after sharding), with the configured
    learning rates set into the optimizers; returns the step to continue from."""
    saved_sharding = trainer_state.get("policy_sharding", "ddp")
    if saved_sharding != run.sharding:
        raise UserError(
            f"the checkpoint was written with policy_sharding={saved_sharding}; resume it with the same setting"
        )
    for name, optimizer in run.optimizers.present().items():
        state = trainer_state["optimizers"][name]
        if name == "policy":
            load_optimizer_state_dict(run.models.policy, optimizer, state)
        else:
            optimizer.load_state_dict(state)
        pcfg = run.pcfg
        set_learning_rate(optimizer, {"policy": pcfg.policy_lr, "decoder": pcfg.decoder_lr, "disc": pcfg.disc_lr}[name])
    for name, guard in run.guards.items():
        if name in trainer_state.get("guards", {}):
            guard.load_state_dict(trainer_state["guards"][name])
    run.reward.load_state_dict(trainer_state["reward_stats"])
    state_lib.restore_rng_state(trainer_state["rng"], run.generators)
    run.prompt_source.load_state_dict(trainer_state["data"])
    return trainer_state["step"]


@torch.no_grad()
def sample_grid(backbone: Backbone, models: Models, prompts: list[str], sampling, seed: int) -> torch.Tensor:
    """The fixed preview: the online policy's samples for `prompts` (fixed seed), decoded by the
    EMA decoder (first rows) and, when the decoder trains, by the online decoder (last rows)."""
    generator = torch.Generator(backbone.device).manual_seed(seed)
    text_emb, text_mask = backbone.encode_prompts(prompts)
    tokens = backbone.sample(text_emb, text_mask, sampling, generator, policy=models.policy).tokens
    decoders = [models.vq_ema.module] + ([models.vq] if models.disc is not None else [])
    return torch.cat([backbone.decode(tokens, decoder=decoder) for decoder in decoders]).cpu()


def start_posttrain(config_path: str, out_dir: str, overrides: list[str], resume: bool) -> tuple[PosttrainRun, int]:
    """Resolve the config, build the models, restore a checkpoint with `resume`; returns the run
    and the step to start from. One process or several under `accelerate launch` / `torchrun`."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cfg, run_dir, device = start_run(config_path, out_dir, overrides, section="posttrain")
    pcfg = cfg.posttrain
    check_posttrain_config(pcfg)
    resumed = resume_point(run_dir, cfg, "posttrain", resume)
    if pcfg.deterministic:
        set_deterministic(True)
    # gradients live in DDP's all-reduce buckets rather than in a second copy
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        kwargs_handlers=[
            DistributedDataParallelKwargs(gradient_as_bucket_view=True), process_group_kwargs(cfg.collective_timeout)
        ],
    )
    device = accelerator.device
    precision = recipe_precision(cfg, accelerator, "posttrain")

    models, backbone, cfg = build_models(cfg, device)
    if accelerator.is_main_process:
        write_run_config(cfg, run_dir)
    if resumed is not None:
        tensors, trainer_state, _ = resumed[1]
        restore_weights(models, tensors)
    if pcfg.policy_grad_checkpointing:
        models.policy.enable_gradient_checkpointing()
    if pcfg.decoder_grad_checkpointing:
        models.vq.enable_gradient_checkpointing()
    sharding = "fsdp" if uses_fsdp(accelerator, pcfg.policy_sharding) else "ddp"
    policy_for_loss = models.policy
    if pcfg.mode != "decoder" and sharding == "fsdp":
        shard_policy(models.policy, bf16_communication=precision.name == "bf16" and device.type == "cuda")
    elif pcfg.mode != "decoder":
        policy_for_loss = accelerator.prepare(models.policy)  # DDP: gradients averaged over processes
    optimizers = build_optimizers(models, pcfg)  # after sharding: FSDP replaces the parameters
    reward = build_posttrain_reward(pcfg, device)
    if accelerator.num_processes > 1:
        reward.reduce_sum = lambda sums: accelerator.reduce(sums, reduction="sum")
    data_rng = np.random.default_rng(cfg.seed)
    generators = {"data": data_rng, "rollout": torch.Generator(device).manual_seed(cfg.seed)}
    run = PosttrainRun(
        cfg, run_dir, backbone, models, optimizers, policy_for_loss, reward,
        build_prompt_source(cfg, backbone.image_size, data_rng), generators, accelerator,
        Shard.of(accelerator, pcfg.prompts_per_step), precision, sharding,
        {name: StepGuard(name, cfg.max_consecutive_skips, device) for name in optimizers.present()},
    )  # fmt: skip
    start_step = 0 if resumed is None else restore_trainer_state(run, trainer_state)
    return run, start_step


@dataclass
class RunOutputs:
    """What the bookkeeping stage writes to: the main process's logs, previews and evaluator."""

    logger: RunLogger  # metrics.jsonl and the trackers (main process only)
    evaluations: MetricsWriter
    evaluator: object | None  # the toy judges; real backbones are evaluated with `ranke eval` on checkpoints
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
    return RunOutputs(logger, evaluations, evaluator, grid_prompts, start_step, time.perf_counter())


def bookkeeping(run: PosttrainRun, outputs: RunOutputs, bar, step: int, record: dict, prompts: list[str]) -> bool:
    """After a step: the record averaged over processes (replicas checked when asked) to
    the run log, the preview grid, the evaluation, the checkpoint, a barrier. Returns whether
    it wrote a checkpoint."""
    pcfg, models, main_process = run.pcfg, run.models, run.accelerator.is_main_process
    record = mean_over_processes(record, run.accelerator)
    if pcfg.check_replicas_every and (step + 1) % pcfg.check_replicas_every == 0:
        check_replicas({"policy": models.policy, "decoder": models.vq}, run.accelerator, step + 1)
    last = step + 1 == pcfg.steps
    grid_due = (step + 1) % pcfg.grid_every == 0 or last
    eval_due = outputs.evaluator is not None and ((pcfg.eval_every and (step + 1) % pcfg.eval_every == 0) or last)
    save_due = (step + 1) % pcfg.save_every == 0 or last
    if main_process:
        if (step + 1) % pcfg.log_every == 0 or last:
            outputs.logger.log({**record, "precision/bf16": int(run.precision.name == "bf16")})  # numeric, as trackers take
        scores = {key[len("reward/") : -len("_mean")]: f"{value:.2f}" for key, value in record.items() if key.startswith("reward/") and key.endswith("_mean")}
        scores |= {"kl": f"{record.get('policy/kl', 0.0):.4f}"}  # the raw reward scores, not the normalised total
        bar.set_postfix(scores)
        if progress_bars_off():  # a worker's log file: one plain line per step instead of the bar
            pace = (time.perf_counter() - outputs.started) / (step + 1 - outputs.start_step)
            print(progress_line(f"posttrain[{pcfg.mode}]", step + 1, pcfg.steps, pace, scores), flush=True)
    # whole weights and checkpoint states are collectives with a sharded policy: every process joins
    if grid_due or eval_due:
        with whole_weights(models.policy), autocast(run.device, run.precision.name):
            if main_process and grid_due:
                shown = outputs.grid_prompts or prompts[: pcfg.grid_prompts]  # real data: this step's first prompts
                grid = sample_grid(run.backbone, models, shown, run.cfg.sampling, run.cfg.seed)
                save_image_grid(grid, run.run_dir / f"samples_{step + 1:06d}.png", nrow=len(shown))
            if main_process and eval_due:
                evaluate_step(outputs.evaluator, run, step + 1, outputs.evaluations)
    if save_due:
        save_posttrain_checkpoint(run, step + 1)
    run.accelerator.wait_for_everyone()
    return save_due


def save_posttrain_checkpoint(run: PosttrainRun, step: int) -> None:
    """Checkpoint `step`: every process gathers (a collective with a sharded policy), the main one writes."""
    tensors = checkpoint_tensors(run.models)
    trainer_state = trainer_state_of(run, step)
    if run.accelerator.is_main_process:
        checkpoint_lib.save_checkpoint(
            run.run_dir, step, tensors, trainer_state, (run.run_dir / "config.yaml").read_text(),
            keep_last=run.pcfg.keep_checkpoints or None,
        )  # fmt: skip


def train_posttrain(config_path: str, out_dir: str, overrides: list[str], resume: bool = False) -> dict:
    """Run (or with `resume`, continue) a post-training run in `out_dir`; one process or several
    under `accelerate launch` / `torchrun` (data parallel over the step's prompts)."""
    run, start_step = start_posttrain(config_path, out_dir, overrides, resume)
    pcfg, main_process = run.pcfg, run.accelerator.is_main_process
    outputs = open_outputs(run, start_step)
    preemption = Preemption(run.cfg.stop_signals, run.run_dir, run.device, main_process)
    bar = progress(
        range(start_step, pcfg.steps), total=pcfg.steps, initial=start_step, desc=f"posttrain[{pcfg.mode}]",
        disable_on_workers=not main_process,
    )  # fmt: skip
    for step in bar:
        timings: dict[str, float] = {}
        with timed(timings, "step"):
            prompts, real_images = next_prompts(run)
            rollout = collect_rollout(run, prompts, timings)
            record = {"step": step + 1, **reward_statistics(rollout, pcfg.group_size)}
            if pcfg.mode != "decoder":
                with timed(timings, "update"):
                    record.update(policy_stage(run, rollout, step))
            if pcfg.mode != "policy":
                with timed(timings, "decoder"):
                    record.update(decoder_stage(run, rollout, real_images, step))
        record.update({f"time/{name}": round(seconds, 4) for name, seconds in timings.items()})
        saved = bookkeeping(run, outputs, bar, step, record, prompts)
        if preemption.requested(step + 1):  # a stop signal reached some process: all stop after this step
            outputs.logger.close()
            preemption.stop(save=None if saved else lambda: save_posttrain_checkpoint(run, step + 1))
    preemption.close()
    outputs.logger.close()
    final = checkpoint_lib.latest_checkpoint(run.run_dir)
    if main_process:
        print(f"posttrain: {pcfg.steps} steps (mode={pcfg.mode}) -> {final}")
    return {"checkpoint": str(final), "steps": pcfg.steps}


def evaluate_step(evaluator, run: PosttrainRun, step: int, writer: MetricsWriter) -> None:
    """Held-out metrics of the online policy with the EMA decoder and, when the decoder trains,
    the online decoder (`mode=policy` leaves both equal to the base decoder), one record each,
    with the precision they were sampled in; the first 32 evaluation images go to
    `eval_samples_<step>_<decoder>.png` in the run."""
    models = run.models
    decoders = {"ema": models.vq_ema.module, **({"online": models.vq} if models.disc is not None else {})}
    for name, decoder in decoders.items():
        result = evaluator(run.backbone, policy=models.policy, decoder=decoder, preview=32)
        label = name if models.disc is not None else "base"
        writer.write({"step": step, "policy": "online", "decoder": label, **result, **run.precision.as_record()})
        save_image_grid(evaluator.preview, writer.path.parent / f"eval_samples_{step:06d}_{label}.png", nrow=8)
