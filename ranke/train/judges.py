"""Recipes: train the toy world's two toy CLIPs (reward and evaluation) and its feature network.

    ranke train-reward --config configs/toy.yaml --out RUN [key=value ...]

`train_judges` trains the models named by `reward.models` (RunConfig's `reward` section), each in
its own sub-directory `RUN/<name>/` (metrics.jsonl, eval.json), and moves each asset to
`RUN/<asset file name>` (`toy_clip_reward.safetensors`, `toy_clip_eval.safetensors`,
`toy_features.safetensors`, the names of the committed files), with `RUN/summary.json`.

Toy CLIP (`train_toy_clip`): each step draws a fresh batch of (image, caption) pairs from the
seeded toy training stream, adds `hard_negatives` perturbed captions per pair to the text side
(one attribute changed, an attribute swapped between two objects, the relation turned or
reversed; see `ranke.rewards.toy_clip.perturb_spec`), and minimises the symmetric InfoNCE loss with a learned
temperature. It is evaluated on held-out prompts rendered by `render_caption` (never training
samples) and written as `RUN/toy_clip.safetensors`.

Toy features (`train_toy_features`): the Frechet distance network, trained on a different
objective (scene attributes from pixels, `ranke.rewards.toy_features.scene_targets`), evaluated on
held-out scenes and by Frechet distances between reference sets, real and degraded, and written
as `RUN/toy_features.safetensors`.

Both run the same short loop (`train_judge`): a batch and its loss (`JudgeTraining.batch_loss`), one
guarded AdamW step on a warm-up + cosine schedule, the record every `log_every` steps, a stop signal
checked after every step (no checkpoints: a rerun starts over), then the evaluation and the asset.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ranke.assets import ASSET_FILES, save_asset
from ranke.config import RunConfig, ToyCLIPConfig, ToyFeatureConfig
from ranke.eval.fid import extract_features, frechet_distance_from_features
from ranke.rewards import toy_clip as clip_lib
from ranke.rewards import toy_features as features_lib
from ranke.rewards.base import normalize_pixels
from ranke.rewards.toy_clip import HARD_NEGATIVE_KINDS, ToyCLIP, ToyCLIPReward, perturb_spec
from ranke.rewards.toy_features import ToyFeatureExtractor, ToyFeatureNet, scene_targets
from ranke.runtime import UserError, progress, seed_everything, select_device
from ranke.toy.captions import NUM_PHRASINGS, CaptionSpec, describe, parse_caption
from ranke.toy.data import ToyConfig, heldout_prompts, heldout_scenes, reference_images, render_caption, train_batch
from ranke.toy.render import render_scenes
from ranke.train.guard import StepGuard
from ranke.train.logging import RunLogger
from ranke.train.preemption import Preemption
from ranke.train.run import start_run, write_run_config
from ranke.train.schedule import warmup_cosine
from ranke.train.trainer_state import GuardedOptimizer

CLIP_ASSET = "toy_clip.safetensors"
FEATURES_ASSET = "toy_features.safetensors"


@dataclass
class JudgeTraining:
    """What one toy judge's training is made of; `train_judge` runs it."""

    label: str  # the progress bar's and the summary line's name
    model: torch.nn.Module
    param_groups: list[dict]  # AdamW's parameter groups (their weight decay)
    # one batch from the generator: the loss, its terms by logged name (checked by the guard), and a
    # callable for the figures logged beside them (called on logging steps only)
    batch_loss: Callable[[np.random.Generator], tuple[torch.Tensor, dict[str, torch.Tensor], Callable[[], dict]]]
    postfix: Callable[[dict], dict]  # the progress bar's figures of a record
    evaluate: Callable[[], dict]  # held-out figures of the trained model
    asset_file: str
    asset_kind: str
    summary: Callable[[dict], str]  # the final line's figures


def train_judge(
    describe: Callable[..., JudgeTraining],
    cfg: ToyCLIPConfig | ToyFeatureConfig,
    out_dir: str | Path,
    seed: int,
    toy: ToyConfig = ToyConfig(),
    device: str = "cpu",
    log_with: str = "tensorboard",
    max_consecutive_skips: int = 10,
    preemption: Preemption | None = None,
) -> dict:
    """Train the judge `describe(cfg, toy, device)` builds for `cfg.steps` steps from seed
    `seed + cfg.seed_offset`, evaluate it, write eval.json and its asset in `out_dir`; returns the
    evaluation (plus train_seconds, steps, seed and the asset path). Logs every `log_every` steps
    (RunLogger: metrics.jsonl and the `log_with` trackers); with `preemption` (`train_judges`'s),
    a stop signal stops it after the current step."""
    run = Path(out_dir)
    run.mkdir(parents=True, exist_ok=True)
    run_seed = seed + cfg.seed_offset
    seed_everything(run_seed)
    device = select_device(device)
    judge = describe(cfg, toy, device)
    lr_factor = lambda step: warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)  # noqa: E731
    adamw = torch.optim.AdamW(judge.param_groups, lr=cfg.lr)
    optimizer = GuardedOptimizer(
        optimizer=adamw, module=judge.model, guard=StepGuard("model", max_consecutive_skips, device), lr=cfg.lr,
        schedule=torch.optim.lr_scheduler.LambdaLR(adamw, lr_factor),
    )  # fmt: skip
    data_rng = np.random.default_rng(run_seed)
    logger = RunLogger(run, log_with, cfg, device)  # a rerun replaces the run's log, it does not extend it
    start = time.perf_counter()
    bar = progress(range(cfg.steps), total=cfg.steps, desc=judge.label)
    for step in bar:
        judge_step(judge, optimizer, data_rng, cfg, step, logger, bar)
        if preemption is not None and preemption.requested(step + 1):  # no checkpoints: a rerun starts over
            logger.close()
            preemption.stop(metrics=run / "metrics.jsonl")
    train_seconds = time.perf_counter() - start
    logger.close()
    return finish_judge(judge, run, train_seconds, cfg.steps, run_seed)


def judge_step(judge: JudgeTraining, optimizer: GuardedOptimizer, data_rng, cfg, step: int, logger: RunLogger, bar) -> None:
    """One batch, one guarded step, and the record when it is due."""
    judge.model.train()
    lr = optimizer.current_lr
    loss, terms, figures = judge.batch_loss(data_rng)
    optimizer.zero_grad()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(judge.model.parameters(), cfg.grad_clip)
    optimizer.step(step + 1, {**terms, "grad_norm": grad_norm})
    if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
        record = {"step": step + 1, "lr": lr, **{name: value.item() for name, value in terms.items()}, **figures()}
        logger.log({**record, **optimizer.guard.metrics()})
        bar.set_postfix(judge.postfix(record))


def finish_judge(judge: JudgeTraining, run: Path, train_seconds: float, steps: int, run_seed: int) -> dict:
    """Evaluate the trained judge, write eval.json and its asset, print its line."""
    result = judge.evaluate()
    path = run / judge.asset_file
    result.update(train_seconds=round(train_seconds, 1), steps=steps, seed=run_seed, asset=str(path))
    (run / "eval.json").write_text(json.dumps(result, indent=2))
    save_asset(path, judge.asset_kind, judge.model.args, judge.model.state_dict())
    print(f"{judge.label}: {judge.summary(result)}; {train_seconds / 60:.1f} min -> {path}")
    return result


# --- toy CLIP ----------------------------------------------------------------------------------


def contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss) with extra negative texts and duplicate-aware masking.

    `image_emb` [B, D] and `text_emb` [B + N, D] are unit-norm; text i < B is image i's caption,
    texts B.. are extra negatives (hard negative captions). Logits are `logit_scale * cos`.
    Image -> text: cross-entropy of image i over all B + N texts, target i. Text -> image:
    cross-entropy of caption i < B over the B images, target i. The loss is their mean.
    A text that describes image i just as well as its own caption (same key: toy batches repeat
    captions, e.g. single objects) is not a negative: it is left out of image i's softmax, and
    likewise on the text side.
    """
    batch = image_emb.shape[0]
    logits = logit_scale * image_emb @ text_emb.T  # [B, B + N]
    targets = torch.arange(batch, device=logits.device)
    duplicate = image_keys[:, None] == text_keys[None, :]
    duplicate[targets, targets] = False
    logits = logits.masked_fill(duplicate, float("-inf"))
    image_to_text = F.cross_entropy(logits, targets)
    text_to_image = F.cross_entropy(logits[:, :batch].T, targets)
    return (image_to_text + text_to_image) / 2


def _keys(specs: list[CaptionSpec], index: dict[CaptionSpec, int]) -> torch.Tensor:
    """Integer ids of the specs' canonical forms (equal ids = the same request)."""
    return torch.tensor([index.setdefault(spec.canonical(), len(index)) for spec in specs])


def clip_batch(rng: np.random.Generator, batch_size: int, hard_negatives: int, toy: ToyConfig):
    """A contrastive batch: images [B, 3, H, W] in [0, 1], B captions then B * hard_negatives
    negative captions, and the keys of the images [B] and of the texts [B * (1 + hard_negatives)]."""
    images, captions, scenes = train_batch(rng, batch_size, toy)
    specs = [CaptionSpec.from_scene(scene) for scene in scenes]
    texts, text_specs = list(captions), list(specs)
    for spec in specs:
        for _ in range(hard_negatives):
            caption, negative = clip_lib.hard_negative_caption(spec, rng, int(rng.integers(NUM_PHRASINGS)))
            texts.append(caption)
            text_specs.append(negative)
    index: dict[CaptionSpec, int] = {}
    return images, texts, _keys(specs, index), _keys(text_specs, index)


def clip_eval_set(toy: ToyConfig, count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """The first `count` held-out prompts with distinct meanings (so that retrieval among them
    has one right answer), each rendered once by `render_caption`: (images [count, 3, H, W]
    in [0, 1], captions)."""
    chosen, seen = [], set()
    for prompt in heldout_prompts(toy):
        key = parse_caption(prompt).canonical()
        if key not in seen:
            seen.add(key)
            chosen.append(prompt)
        if len(chosen) == count:
            break
    if len(chosen) < count:
        raise ValueError(f"only {len(chosen)} distinct held-out prompts, {count} requested")
    rng = np.random.default_rng(seed)
    images = np.stack([render_caption(prompt, rng, toy) for prompt in chosen])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0), chosen


@torch.no_grad()
def evaluate_toy_clip(
    reward: ToyCLIPReward, toy: ToyConfig = ToyConfig(), count: int = 1000, group: int = 100, seed: int = 0
) -> dict:
    """Held-out figures of a toy CLIP.

    retrieval_top1: image -> caption top-1 among `group` candidate captions (its own and
    group - 1 others), averaged over count / group groups; pair_accuracy: fraction of
    (image, other caption) pairs of a group with score(image, own) > score(image, other);
    hard_negative_accuracy: score(image, own) > score(image, perturbed caption), overall and
    per perturbation kind; mean scores of matching and non-matching pairs (100 x cosine).
    """
    images, captions = clip_eval_set(toy, count, seed)
    image_emb = torch.cat([reward.image_embeddings(chunk) for chunk in images.split(200)])
    text_emb = reward.text_embeddings(captions)
    top1, pairs, matching, other = [], [], [], []
    for start in range(0, count - group + 1, group):
        scores = reward.scale * image_emb[start : start + group] @ text_emb[start : start + group].T
        own = scores.diagonal()
        off_diagonal = ~torch.eye(group, dtype=torch.bool)
        top1.append((scores.argmax(dim=1) == torch.arange(group)).float().mean().item())
        pairs.append((own[:, None] > scores)[off_diagonal].float().mean().item())
        matching.append(own.mean().item())
        other.append(scores[off_diagonal].mean().item())

    rng = np.random.default_rng(seed + 1)
    rows, kinds, negatives = [], [], []
    for row, caption in enumerate(captions):
        spec = parse_caption(caption)
        for kind in HARD_NEGATIVE_KINDS:
            negative = perturb_spec(spec, kind, rng)
            if negative is not None:
                rows.append(row)
                kinds.append(kind)
                negatives.append(describe(negative, int(rng.integers(NUM_PHRASINGS))))
    own = (image_emb * text_emb).sum(-1)[rows]
    wrong = (image_emb[rows] * reward.text_embeddings(negatives)).sum(-1)
    answers = (own > wrong).tolist()
    hard = {kind: [a for a, k in zip(answers, kinds) if k == kind] for kind in HARD_NEGATIVE_KINDS}
    return {
        "retrieval_top1": float(np.mean(top1)),
        "pair_accuracy": float(np.mean(pairs)),
        "hard_negative_accuracy": float(np.mean(answers)),
        "hard_negative_accuracy_by_kind": {kind: float(np.mean(v)) for kind, v in hard.items() if v},
        "mean_score_matching": float(np.mean(matching)),
        "mean_score_other": float(np.mean(other)),
        "n": count,
        "group": group,
    }


def train_toy_clip(cfg: ToyCLIPConfig, out_dir: str | Path, seed: int, **settings) -> dict:
    """Train one toy CLIP (`train_judge`, which takes the `settings`), evaluate it on held-out
    prompts, write `out_dir/toy_clip.safetensors`; returns the evaluation."""
    return train_judge(toy_clip_training, cfg, out_dir, seed, **settings)


def toy_clip_training(cfg: ToyCLIPConfig, toy: ToyConfig, device: torch.device) -> JudgeTraining:
    """A toy CLIP and how it trains: symmetric InfoNCE with hard negatives (`contrastive_loss`)."""
    model = ToyCLIP(cfg.model).to(device)
    # weight decay on matrices only (not on biases, norms or the temperature), as in CLIP
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]

    def batch_loss(data_rng: np.random.Generator):
        images, texts, image_keys, text_keys = clip_batch(data_rng, cfg.batch_size, cfg.hard_negatives, toy)
        pixels = normalize_pixels(images.to(device), clip_lib.PIXEL_MEAN, clip_lib.PIXEL_STD)
        image_emb = F.normalize(model.encode_image(pixels), dim=-1)
        text_emb = F.normalize(model.encode_text(clip_lib.tokenize(texts, cfg.model.max_words).to(device)), dim=-1)
        loss = contrastive_loss(image_emb, text_emb, model.logit_scale, image_keys.to(device), text_keys.to(device))
        figures = lambda: {"logit_scale": model.logit_scale.item(), **batch_figures(image_emb, text_emb, cfg.hard_negatives)}  # noqa: E731
        return loss, {"loss": loss}, figures

    return JudgeTraining(
        label="toy clip", model=model,
        param_groups=[{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": others, "weight_decay": 0.0}],
        batch_loss=batch_loss, postfix=lambda record: {"loss": f"{record['loss']:.3f}", "scale": f"{record['logit_scale']:.1f}"},
        evaluate=lambda: evaluate_toy_clip(ToyCLIPReward(model, device), toy, cfg.eval_prompts, cfg.eval_group),
        asset_file=CLIP_ASSET, asset_kind=clip_lib.ASSET_KIND,
        summary=lambda result: (
            f"retrieval top-1 {result['retrieval_top1']:.3f} among {cfg.eval_group}, pair accuracy "
            f"{result['pair_accuracy']:.3f}, hard negatives {result['hard_negative_accuracy']:.3f}"
        ),
    )  # fmt: skip


@torch.no_grad()
def batch_figures(image_emb: torch.Tensor, text_emb: torch.Tensor, hard_negatives: int) -> dict[str, float]:
    """How often the batch's own caption beats every one of its hard negatives (nan without any)."""
    if not hard_negatives:
        return {"batch_hard_negative_accuracy": float("nan")}
    batch = image_emb.shape[0]
    cosines = image_emb @ text_emb.T
    own = cosines.diagonal()
    beaten = own[:, None] > cosines[:, batch:].view(batch, batch, -1).diagonal().T
    return {"batch_hard_negative_accuracy": beaten.float().mean().item()}


# --- toy feature network -----------------------------------------------------------------------

FD_BLUR_SIGMAS = (0.5, 1.0, 2.0)
FD_NOISE_SIGMAS = (0.02, 0.05, 0.1)


def feature_losses(
    predictions: dict[str, torch.Tensor], targets: features_lib.SceneTargets, color_weight: float
) -> dict[str, torch.Tensor]:
    """The feature network's multi-task loss and its terms: cross-entropy for the object count
    and the background kind; binary cross-entropy for object presence and layout cells, summed
    over the labels and averaged over the images (a mean over 48 mostly-absent labels would
    leave each present object a tiny gradient); `color_weight` x MSE for the background colour.
    "total" is the sum of the terms."""

    def multilabel(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / len(labels)

    terms = {
        "count": F.cross_entropy(predictions["count"], targets.count),
        "attributes": multilabel(predictions["attributes"], targets.attributes),
        "objects": multilabel(predictions["objects"], targets.objects),
        "layout": multilabel(predictions["layout"], targets.layout),
        "background": F.cross_entropy(predictions["background"], targets.background),
        "background_color": color_weight * F.mse_loss(predictions["background_color"], targets.background_color),
    }
    terms["total"] = sum(terms.values())
    return terms


def _targets_to(targets: features_lib.SceneTargets, device: torch.device) -> features_lib.SceneTargets:
    return features_lib.SceneTargets(**{name: value.to(device) for name, value in vars(targets).items()})


@torch.no_grad()
def evaluate_toy_features(
    model: ToyFeatureNet,
    toy: ToyConfig = ToyConfig(),
    scene_count: int = 1000,
    fd_images: int = 1000,
    device: str | torch.device = "cpu",
) -> dict:
    """Held-out figures of a feature network.

    Attribute accuracies on the first `scene_count` held-out scenes (count, the exact set of
    (shape, colour, size) objects, background kind, the exact layout cells; mean absolute error
    of the background colours). Frechet distances in its feature space between the first
    `fd_images` reference images and the next `fd_images` (real vs real), and between the first
    set and the second one blurred (Gaussian, sigma in pixels) or noised (std in [0, 1] units).
    """
    model.eval()
    scenes = heldout_scenes(toy)[:scene_count]
    images = torch.from_numpy(render_scenes(scenes, toy.image_size, toy.supersample)).permute(0, 3, 1, 2)
    chunks = [
        model(features_lib.to_network_input(chunk.to(device), model.args.image_size)) for chunk in images.split(200)
    ]
    predictions = {name: torch.cat([c[name] for c in chunks]).cpu() for name in chunks[0]}
    targets = scene_targets(scenes)
    result = {
        "count_accuracy": (predictions["count"].argmax(1) == targets.count).float().mean().item(),
        "attributes_exact": (
            ((predictions["attributes"] > 0) == targets.attributes.bool()).all(1).float().mean().item()
        ),
        "objects_exact": ((predictions["objects"] > 0) == targets.objects.bool()).all(1).float().mean().item(),
        "background_accuracy": (predictions["background"].argmax(1) == targets.background).float().mean().item(),
        "layout_exact": ((predictions["layout"] > 0) == targets.layout.bool()).all(1).float().mean().item(),
        "background_color_mae": (predictions["background_color"] - targets.background_color).abs().mean().item(),
    }

    extractor = ToyFeatureExtractor(model, device)
    reference = reference_images(toy, 2 * fd_images)
    first = extract_features(extractor, reference[:fd_images])
    second = torch.from_numpy(np.array(reference[fd_images:])).permute(0, 3, 1, 2).float() / 255.0

    def distance(images: torch.Tensor) -> float:
        return frechet_distance_from_features(first, np.concatenate([extractor(c) for c in images.split(200)]))

    generator = torch.Generator().manual_seed(0)
    result["fd_real"] = distance(second)
    result["fd_blur"] = {str(s): distance(features_lib.gaussian_blur(second, s)) for s in FD_BLUR_SIGMAS}
    result["fd_noise"] = {str(s): distance(features_lib.add_noise(second, s, generator)) for s in FD_NOISE_SIGMAS}
    result.update(scenes=scene_count, fd_images=fd_images)
    return result


def train_toy_features(cfg: ToyFeatureConfig, out_dir: str | Path, seed: int, **settings) -> dict:
    """Train the feature network (`train_judge`, which takes the `settings`), evaluate it, write
    `out_dir/toy_features.safetensors`; returns the evaluation."""
    return train_judge(toy_features_training, cfg, out_dir, seed, **settings)


def toy_features_training(cfg: ToyFeatureConfig, toy: ToyConfig, device: torch.device) -> JudgeTraining:
    """The feature network and how it trains: scene attributes from pixels (`feature_losses`)."""
    model = ToyFeatureNet(cfg.model).to(device)

    def batch_loss(data_rng: np.random.Generator):
        images, _, scenes = train_batch(data_rng, cfg.batch_size, toy)
        predictions = model(features_lib.to_network_input(images.to(device), cfg.model.image_size))
        losses = feature_losses(predictions, _targets_to(scene_targets(scenes), device), cfg.color_weight)
        return losses["total"], {f"loss_{name}": value for name, value in losses.items()}, dict

    return JudgeTraining(
        label="toy features", model=model, param_groups=[{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}],
        batch_loss=batch_loss, postfix=lambda record: {"loss": f"{record['loss_total']:.3f}"},
        evaluate=lambda: evaluate_toy_features(model, toy, cfg.eval_scenes, cfg.fd_images, device),
        asset_file=FEATURES_ASSET, asset_kind=features_lib.ASSET_KIND,
        summary=lambda result: (
            f"count {result['count_accuracy']:.3f}, objects exact {result['objects_exact']:.3f}, background "
            f"{result['background_accuracy']:.3f}; FD real {result['fd_real']:.2f}, blur(1) "
            f"{result['fd_blur']['1.0']:.2f}, noise(0.05) {result['fd_noise']['0.05']:.2f}"
        ),
    )  # fmt: skip


# --- the recipe: all three judges --------------------------------------------------------------

TRAINERS = {"reward_clip": train_toy_clip, "eval_clip": train_toy_clip, "features": train_toy_features}


def train_judges(config: str | RunConfig, out_dir: str, overrides: list[str] = ()) -> dict:
    """`ranke train-reward`: train the models of `reward.models`; returns the summary it writes.

    The summary maps each model name to its held-out figures (retrieval and pair accuracy of a
    toy CLIP; attribute accuracies and Frechet distance sanity numbers of the feature network),
    its training time and its asset path.
    """
    cfg, run, _ = start_run(config, out_dir, overrides, section="reward")
    unknown = [name for name in cfg.reward.models if name not in TRAINERS]
    if unknown or not cfg.reward.models:
        raise UserError(f"reward.models must list some of {', '.join(TRAINERS)}; got {cfg.reward.models}")
    write_run_config(cfg, run)
    preemption = Preemption(cfg.stop_signals, run)
    summary = {}
    for name in cfg.reward.models:
        result = TRAINERS[name](
            getattr(cfg.reward, name), run / name, cfg.seed, toy=cfg.toy, device=cfg.device, log_with=cfg.log_with,
            max_consecutive_skips=cfg.max_consecutive_skips, preemption=preemption,
        )  # fmt: skip
        asset = run / ASSET_FILES[name]
        Path(result["asset"]).replace(asset)
        summary[name] = {**result, "asset": str(asset)}
    preemption.close()
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
