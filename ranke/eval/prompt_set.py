"""`ranke eval --protocol coco30k|hpsv2`: the paper's real-world evaluations (METHOD.md section 5).

    ranke eval --protocol coco30k --captions coco/captions_val2014.json --ref-dir coco/val2014 \
        --clip-path checkpoints/clip-vit-base-patch32 --inception-weights inception-2015-12-05.pt \
        --ckpt runs/llamagen_ranke --policy ema --decoder ema --out runs/coco30k_ranke

1. prompts: one caption per COCO image, 30k of them, drawn with seed 42 (`ranke.data.read_eval_prompts`;
   a .txt/.jsonl/.csv prompt file works too);
2. one image per prompt (seed 42, the config's guidance), written as they come, resumable and split
   across processes under `accelerate launch` / `torchrun` (`ranke.sample_folder.sample_prompts_to_dir`);
3. FID: clean-fid's Inception-v3 features of the samples against the reference folder, both sides
   center-cropped and resized to the model resolution (`ranke.eval.fid.folder_distance`), with
   precision, recall, density and coverage of the samples against the reference in the same
   features (`ranke.eval.manifold`, k = 5, at most 5000 images a side);
4. CLIP score: CLIP ViT-B/32 (a local directory) between each sample and "A photo depicts" + its
   caption, 100 x cosine, mean over the samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from ranke.eval.fid import folder_distance
from ranke.sample_folder import ModelChoice, load_backbone, model_source, sample_into_dir, sample_prompts_to_dir
from ranke.runlock import claim_output_dir
from ranke.runtime import UserError, progress, read_user_text, select_device
from ranke.toy.tools import CAPTIONS_FILE

CLIP_SCORE_PREFIX = "A photo depicts"


def score_folder(folder: Path, scorer, batch_size: int = 64) -> torch.Tensor:
    """Scores [N] of a reward model (`ranke.rewards` protocol) on a sample folder's images and captions."""
    records = [json.loads(line) for line in read_user_text(folder / CAPTIONS_FILE, "caption list").splitlines() if line.strip()]
    scores = []
    with torch.no_grad():
        for start in progress(range(0, len(records), batch_size), desc=f"{scorer.name} scores"):
            batch = records[start : start + batch_size]
            pixels = np.stack([read_rgb(folder / record["file"]) for record in batch])
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255).to(scorer.device)
            scores.append(scorer(images, [record["caption"] for record in batch]).cpu())
    return torch.cat(scores)


def clip_score_of_folder(
    folder: Path, clip_path: str, prefix: str = CLIP_SCORE_PREFIX, batch_size: int = 64, device: str = "auto"
) -> float:
    """Mean 100 x cosine between each image of a sample folder and its caption (captions.jsonl)."""
    from ranke.rewards.clip import CLIPReward

    scorer = CLIPReward(clip_path, select_device(device), prefix=prefix, name="clip_score")
    return score_folder(folder, scorer, batch_size).mean().item()


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def evaluate_prompt_set(
    *,
    captions: str,
    ref_dir: str,
    out_dir: str,
    model: ModelChoice = ModelChoice(),
    n: int = 30000,
    seed: int = 42,
    features: str = "inception",
    inception_weights: str | None = None,
    clip_path: str | None = None,
    batch_size: int = 64,
    overwrite: bool = False,
) -> dict:
    """Sample the prompt set with the chosen `model` (`ranke.sample_folder.load_backbone`), then FID
    against `ref_dir` and the CLIP score; writes OUT/metrics.json.

    OUT/images is resumed only when it was sampled with the same model and settings
    (`ranke.sample_folder.sample_into_dir`); `overwrite` replaces it."""
    from ranke.data import read_eval_prompts

    if not Path(ref_dir).is_dir():
        raise UserError(f"reference image folder '{ref_dir}' not found")
    prompts = read_eval_prompts(captions, n=n, seed=seed)
    claim_output_dir(out_dir)  # the main process locks it; the others only see it exist
    out = Path(out_dir)
    images = out / "images"
    summary = sample_prompts_to_dir(
        out_dir=str(images), model=model, prompts=prompts, seed=seed, batch_size=batch_size, overwrite=overwrite
    )
    if not PartialState().is_main_process:
        return summary
    device = model.requested_device()
    resolution = read_rgb(images / "00000.png").shape[0]
    distance = folder_distance(images, ref_dir, features, inception_weights, resolution, batch_size, device)
    metrics = {
        "protocol": "prompt set (COCO-30K style)",
        "captions": str(captions),
        "n": len(prompts),
        "seed": seed,
        "cfg_scale": summary["cfg_scale"],
        "resolution": resolution,
        "fid": distance["fd"],
        "fid_features": features,
        **{key: distance[key] for key in ("precision", "recall", "density", "coverage", "nearest_k")},
        "clip_score": clip_score_of_folder(images, clip_path, batch_size=batch_size, device=device) if clip_path else None,
        "ckpt": model.checkpoint,
        "policy": model.policy,
        "decoder": model.decoder,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")


def evaluate_hpsv2_benchmark(
    *,
    prompts_dir: str,
    hpsv2_path: str,
    out_dir: str,
    model: ModelChoice = ModelChoice(),
    seed: int = 42,
    batch_size: int = 64,
    overwrite: bool = False,
) -> dict:
    """The HPSv2 benchmark: one image per HPDv2 test prompt of each style (`<style>.json`, a JSON
    list of prompts, as the HPSv2 repository ships them) from the chosen `model`
    (`ranke.sample_folder.load_backbone`), scored by HPSv2.1; per-style means and their average (the
    paper's "HPSv2 average"). Needs the `hpsv2` extra (open_clip)."""
    from ranke.rewards.hpsv2 import HPSv2Reward

    missing = [style for style in HPSV2_STYLES if not (Path(prompts_dir) / f"{style}.json").is_file()]
    if missing:
        raise UserError(f"'{prompts_dir}' lacks {', '.join(f'{m}.json' for m in missing)} (HPDv2 benchmark prompts)")
    scorer = HPSv2Reward(hpsv2_path, select_device(model.requested_device()))
    model = model.resolved()
    backbone, cfg = load_backbone(model)  # once for the four styles
    claim_output_dir(out_dir)  # the main process locks it; the others only see it exist
    out = Path(out_dir)
    source = model_source(model, cfg)
    metrics: dict = {"protocol": "hpsv2", "seed": seed, "cfg_scale": cfg.sampling.cfg_scale}
    for style in HPSV2_STYLES:
        prompts = json.loads(read_user_text(Path(prompts_dir) / f"{style}.json", "HPDv2 prompt file"))
        folder = out / "images" / style
        sample_into_dir(
            backbone, cfg.sampling, prompts, folder, seed=seed, batch_size=batch_size, source=source, overwrite=overwrite
        )
        if PartialState().is_main_process:
            metrics[style] = score_folder(folder, scorer, batch_size).mean().item()
    if not PartialState().is_main_process:
        return metrics
    metrics["average"] = sum(metrics[style] for style in HPSV2_STYLES) / len(HPSV2_STYLES)
    metrics.update(ckpt=model.checkpoint, policy=model.policy, decoder=model.decoder)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
