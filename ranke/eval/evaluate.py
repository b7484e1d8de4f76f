"""`ranke eval`: the toy world's evaluation protocol, the stand-in for the paper's MS-COCO 30K one.

The first `n` held-out prompts are sampled once each (seeded, the config's sampling settings),
decoded, rounded to 8-bit pixels (as they would be saved) and scored:

* reward: the training reward model (toy CLIP "reward", 100 x cosine), mean over the images;
* clip_score: the evaluation-only toy CLIP (other seed and width), mean; the paper's CLIP score;
* colorfulness: Hasler and Suesstrunk's colorfulness (`ranke.rewards.colorfulness`), mean; real
  renders are low-saturation backgrounds with saturated objects, so it shows a drift towards
  vivid colour that a reward with that direction can cause;
* fd: Frechet distance in the toy feature network's space between the generated images and the
  real images of the same prompts, i.e. the renders of the held-out scenes the captions were
  written for (COCO's protocol: generated images vs the val images of the captions);
* precision, recall, density, coverage: the k-nearest-neighbour manifold metrics (k = 5,
  `ranke.eval.manifold`) of the generated images' features against the same real features:
  FD taken apart into fidelity (precision, density: samples on the real manifold) and diversity
  (recall, coverage: real images with a sample near them);
* kid, kid_se: KID (unbiased MMD^2, cubic kernel) between the same two feature sets and its
  standard error over `kid_subsets(n)` disjoint subsets (`ranke.eval.fid.kernel_distance`),
  paired: image i and real image i share a prompt, so their pair is left out of the cross term;
* verifier_accuracy: the toy verifier's whole-prompt accuracy (GenEval's overall score), with
  verifier_object_accuracy and verifier_by_num_objects;
* token_kl: KL(policy || real) in nats between the codebook histogram of the sampled tokens and
  that of the ground-truth tokens Q(E(x)) of those same real images, both with add-one smoothing
  over the K codes (`ranke.eval.shift`); token_kl_per_position is the mean of per-position KLs;
* token_entropy: entropy in bits of the sampled tokens' histogram (token_entropy_real: of the
  ground-truth tokens);
* roundtrip_agreement: mean over the images of the share of their tokens that the frozen encoder
  and quantizer give back from the 8-bit decoded image (`ranke.eval.shift.roundtrip_agreement`);
  roundtrip_agreement_real: the same for the real images' ground-truth codes decoded by the same
  decoder, in the same call (same decoder, same precision): the value to read the first against;
* preview_correct: the verifier's verdict on each of the first `preview` images (kept in
  `Evaluator.preview`), so sample grids can mark them.

How much of each metric is the evaluation's own sampling noise, and where real images stand:
`Evaluator.real_reference` scores a second real image of each prompt (another random scene
satisfying its caption) exactly like a generator's samples, so its FD / KID are those of two
real image sets of the evaluation's size, the floor a perfect generator would reach.

`Evaluator` does the fixed work once (loads the three judges, renders the real images, computes
their features and codes) and is then called on any backbone, policy and decoder, e.g. from a
training loop with EMA copies. Batch k is sampled from its own seed (`ranke.sample_folder.batch_seed`,
as `ranke sample` does); under `torchrun` / `accelerate launch`, `ranke eval` splits every batch
over the processes (`split_over_processes`) and gathers the per-image scores, so the metrics are
those of one process. The ground-truth codes come from the base tokenizer's encoder,
which post-training never changes (RankE trains only the decoder side, `VQModel.freeze_token_space`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ranke.assets import asset_path
from ranke.backbones.base import Backbone
from ranke.backbones.toy import load_tokenizer
from ranke.config import RunConfig, SamplingConfig
from ranke.eval.fid import frechet_distance_from_features, kernel_distance
from ranke.eval.manifold import MIN_FEATURES, NEAREST_K, manifold_metrics
from ranke.eval.shift import (
    code_histogram,
    per_position_kl,
    roundtrip_agreement,
    token_agreement,
    token_entropy_bits,
    token_kl,
)
from ranke.sample_folder import ModelChoice, batch_seed, load_backbone, process_rows
from ranke.images import save_image_grid
from ranke.models.gpt import Transformer
from ranke.models.vq import VQModel, to_model_range, to_unit_range
from ranke.rewards.colorfulness import colorfulness
from ranke.rewards.toy_clip import load_toy_clip
from ranke.rewards.toy_features import load_toy_features
from ranke.runlock import claim_output_dir
from ranke.runtime import UserError, progress
from ranke.toy.captions import parse_caption
from ranke.toy.data import scene_for_caption, split_scenes_and_prompts
from ranke.toy.render import render_scenes
from ranke.toy.verifier import score_image, summarize

# The per-image scores averaged into the metrics of the same name
SCORES = ("reward", "clip_score", "colorfulness", "roundtrip_agreement")

# The metrics of the one-row markdown table, in order, with their number formats.
TABLE_COLUMNS = {
    "n": "{:d}",
    "reward": "{:.2f}",
    "clip_score": "{:.2f}",
    "fd": "{:.2f}",
    "precision": "{:.3f}",
    "recall": "{:.3f}",
    "density": "{:.3f}",
    "coverage": "{:.3f}",
    "verifier_accuracy": "{:.3f}",
    "token_kl": "{:.4f}",
    "token_entropy": "{:.2f}",
    "roundtrip_agreement": "{:.3f}",
}


def kid_subsets(n: int) -> int:
    """Disjoint KID subsets for n images per side: about 25+ images each, at most 10 subsets."""
    return max(1, min(10, n // 25))


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] rounded to the 256 levels of an 8-bit PNG (still float in [0, 1])."""
    return (images.clamp(0.0, 1.0) * 255.0).round() / 255.0


def decode_8bit(decoder: VQModel, codes: torch.Tensor) -> torch.Tensor:
    """`codes` [B, L] decoded by `decoder` and rounded to 8 bits, as a saved sample would be:
    float images [B, 3, H, W] in [0, 1]."""
    return quantize(to_unit_range(decoder.decode_codes(codes)).float())


class Evaluator:
    """Scores a backbone on the first `n` prompts of a split (`heldout`, or `validation` for
    choosing settings); build once, call many times.

    `tokenizer` encodes the real images into ground-truth codes (default: the base tokenizer
    `cfg.posttrain.tokenizer`, None meaning the committed toy tokenizer). `sampling` defaults to
    `cfg.sampling`. Every call samples with the same seed, so two calls differ only by the models.
    """

    def __init__(
        self,
        cfg: RunConfig,
        device: torch.device | str,
        n: int = 1000,
        seed: int = 0,
        batch_size: int = 64,
        sampling: SamplingConfig | None = None,
        tokenizer: VQModel | None = None,
        split_over_processes: bool = False,
        split: str = "heldout",
    ):
        try:
            scenes, prompts = split_scenes_and_prompts(split, cfg.toy)
        except ValueError as err:
            raise UserError(str(err)) from None
        if not MIN_FEATURES <= n <= len(prompts):  # the manifold metrics need 5 nearest neighbours of each image
            raise UserError(f"--n must be between {MIN_FEATURES} and the {len(prompts)} {split} prompts (toy.{split}_size), got {n}")
        if batch_size < 1:
            raise UserError(f"--batch-size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.n, self.seed, self.batch_size = n, seed, batch_size
        self.split_over_processes = split_over_processes
        self.sampling = sampling or cfg.sampling
        self.prompts = prompts[:n]
        self.specs = [parse_caption(prompt) for prompt in self.prompts]
        self.reward = load_toy_clip(asset_path("reward_clip"), self.device, name="reward")
        self.clip = load_toy_clip(asset_path("eval_clip"), self.device, name="clip_score")
        self.features = load_toy_features(asset_path("features"), self.device)
        self.tokenizer = tokenizer or load_tokenizer(cfg.posttrain.tokenizer, self.device)
        self.codebook_size = self.tokenizer.args.codebook_size
        self.toy = cfg.toy

        real = torch.from_numpy(render_scenes(scenes[:n], cfg.toy.image_size, cfg.toy.supersample))
        real = real.permute(0, 3, 1, 2)
        feature_chunks, code_chunks = [], []
        with torch.no_grad():
            for chunk in progress(real.split(batch_size), desc="eval: real images"):
                feature_chunks.append(self.features(chunk))
                code_chunks.append(self.encode(chunk.float().div(255.0)).cpu())
        self.real_images = real  # uint8 [n, 3, H, W], the real image of each prompt
        self.real_features = np.concatenate(feature_chunks)
        self.real_codes = torch.cat(code_chunks)
        self.real_histogram = code_histogram(self.real_codes, self.codebook_size)
        self.preview = torch.empty(0)  # the first images of the last call, for sample grids

    @torch.no_grad()
    def __call__(
        self, backbone: Backbone, policy: Transformer | None = None, decoder: VQModel | None = None, preview: int = 64
    ) -> dict:
        """Metrics of `backbone` with `policy` / `decoder` in place of its own (None: its own).

        Keeps the first `preview` images in `self.preview`."""
        from accelerate import PartialState
        from accelerate.utils import gather_object

        start = time.perf_counter()
        state = PartialState(cpu=backbone.device.type == "cpu") if self.split_over_processes else None
        chunks = []  # scores of this process's rows, one dict per batch
        bar = progress(total=self.n, desc="eval: sampling", disable_on_workers=state is not None and not state.is_main_process)
        for batch, begin in enumerate(range(0, self.n, self.batch_size)):
            end = min(begin + self.batch_size, self.n)
            first, last = process_rows(begin, end, state) if state is not None else (begin, end)
            if last > first:
                chunks.append(self._score_rows(backbone, policy, decoder, batch, begin, end, first, last, preview))
            bar.update(end - begin)
        bar.close()
        if state is not None and state.num_processes > 1:
            chunks = sorted(gather_object(chunks), key=lambda chunk: chunk["first"])
        self.preview = torch.cat([chunk["preview"] for chunk in chunks])
        scores = {key: torch.cat([chunk[key] for chunk in chunks]) for key in SCORES}
        features = np.concatenate([chunk["features"] for chunk in chunks])
        codes = torch.cat([chunk["codes"] for chunk in chunks])
        verdicts = [verdict for chunk in chunks for verdict in chunk["verdicts"]]
        return {
            "n": self.n,
            **self._metrics(scores, features, codes, verdicts),
            "roundtrip_agreement_real": torch.cat([chunk["roundtrip_real"] for chunk in chunks]).mean().item(),
            "preview_correct": [bool(verdict.correct) for verdict in verdicts[: len(self.preview)]],
            "cfg_scale": self.sampling.cfg_scale,
            "seed": self.seed,
            "seconds": round(time.perf_counter() - start, 1),
        }

    @torch.no_grad()
    def real_reference(self, seed: int = 1) -> dict:
        """The metrics of real images: for each prompt another random scene satisfying its caption
        (drawn from `seed`), rendered and scored like samples. FD / KID are then those of two
        real image sets of size n, the evaluation's own noise floor. Round-trip agreements use the
        evaluator's tokenizer as the decoder (the base decoder where the evaluator was built with
        the base tokenizer): of these images' codes, and (roundtrip_agreement_real) of the first
        real images' ground-truth codes, as a call with that decoder reports it."""
        rng = np.random.default_rng(seed)
        scenes = [scene_for_caption(spec, rng) for spec in self.specs]
        real = torch.from_numpy(render_scenes(scenes, self.toy.image_size, self.toy.supersample)).permute(0, 3, 1, 2)
        scores = {key: [] for key in (*SCORES, "roundtrip_real", "features", "codes", "verdicts")}

        def decode(codes):  # the evaluator's own decoder, 8-bit as a sample
            return decode_8bit(self.tokenizer, codes)

        for begin in range(0, self.n, self.batch_size):
            images = real[begin : begin + self.batch_size].float().div(255.0).to(self.device)
            prompts = self.prompts[begin : begin + self.batch_size]
            scores["reward"].append(self.reward(images, prompts).cpu())
            scores["clip_score"].append(self.clip(images, prompts).cpu())
            scores["colorfulness"].append(colorfulness(images).cpu())
            scores["features"].append(self.features(images))
            codes = self.encode(images)
            scores["codes"].append(codes.cpu())
            scores["roundtrip_agreement"].append(roundtrip_agreement(codes, decode, self.encode))
            real_codes = self.real_codes[begin : begin + self.batch_size].to(self.device)
            scores["roundtrip_real"].append(roundtrip_agreement(real_codes, decode, self.encode))
            pixels = images.permute(0, 2, 3, 1).cpu().numpy()
            scores["verdicts"] += [score_image(im, spec) for im, spec in zip(pixels, self.specs[begin : begin + len(prompts)])]
        metrics = self._metrics(
            {key: torch.cat(scores[key]) for key in SCORES}, np.concatenate(scores["features"]),
            torch.cat(scores["codes"]), scores["verdicts"],
        )  # fmt: skip
        roundtrip_real = torch.cat(scores["roundtrip_real"]).mean().item()
        return {"n": self.n, **metrics, "roundtrip_agreement_real": roundtrip_real, "seed": seed}

    def _metrics(self, scores: dict, features, codes, verdicts) -> dict:
        """The metrics of n scored images (`scores`: the per-image `SCORES`) against the real side
        (see the module docstring)."""
        histogram = code_histogram(codes, self.codebook_size)
        verifier = summarize(verdicts)
        kid, kid_se = kernel_distance(features, self.real_features, kid_subsets(self.n), seed=self.seed, paired=True)
        return {
            **{key: scores[key].mean().item() for key in SCORES},
            "fd": frechet_distance_from_features(features, self.real_features),
            **manifold_metrics(self.real_features, features, NEAREST_K),
            "kid": kid,
            "kid_se": kid_se,
            "verifier_accuracy": verifier["accuracy"],
            "verifier_object_accuracy": verifier["object_accuracy"],
            "verifier_by_num_objects": verifier["by_num_objects"],
            "token_kl": token_kl(histogram, self.real_histogram),
            "token_kl_per_position": per_position_kl(codes, self.real_codes, self.codebook_size),
            "token_entropy": token_entropy_bits(histogram),
            "token_entropy_real": token_entropy_bits(self.real_histogram),
        }

    @torch.no_grad()
    def reconstruction(self, decoder: VQModel) -> dict:
        """How `decoder` renders the ground-truth codes of the real images (the inputs a frozen
        decoder was trained on): PSNR in dB and FD of the 8-bit reconstructions to the images.
        The co-evolved decoder's reconstruction anchor is meant to keep both where the base
        decoder has them."""
        reconstructions, squared_errors = [], []
        for codes, real in zip(self.real_codes.split(self.batch_size), self.real_images.split(self.batch_size)):
            image = decode_8bit(decoder, codes.to(self.device))
            reconstructions.append(self.features(image))
            squared_errors.append((image.cpu() - real.float().div(255.0)).pow(2).flatten(1).mean(dim=1))
        mse = torch.cat(squared_errors)
        return {
            "recon_psnr": float((10 * torch.log10(1.0 / mse.clamp_min(1e-12))).mean()),
            "recon_fd": frechet_distance_from_features(np.concatenate(reconstructions), self.real_features),
        }

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Codes [B, L] of images [B, 3, H, W] in [0, 1] from the frozen encoder and quantizer."""
        return self.tokenizer.encode_codes(to_model_range(images.to(self.device))).flatten(1)

    def _score_rows(self, backbone, policy, decoder, batch, begin, end, first, last, preview) -> dict:
        """Sample and score rows [first, last) of batch `batch` ([begin, end)) with the batch's own
        draws, so the images do not depend on which process samples them; the real images' codes
        of the same rows make the round-trip reference."""
        prompts = self.prompts[first:last]
        generator = torch.Generator(backbone.device).manual_seed(batch_seed(self.seed, batch))
        text_emb, text_mask = backbone.encode_prompts(prompts)
        tokens = backbone.sample(
            text_emb, text_mask, self.sampling, generator, policy=policy, row_offset=first - begin, total_rows=end - begin
        ).tokens

        def decode(codes):  # the decoder under test, rounded to 8 bits as a saved image
            return quantize(backbone.decode(codes, decoder).float())

        images = decode(tokens)
        pixels = images.permute(0, 2, 3, 1).cpu().numpy()
        real_codes = self.real_codes[first:last].to(backbone.device)
        return {
            "first": first,
            "reward": self.reward(images, prompts).cpu(),
            "clip_score": self.clip(images, prompts).cpu(),
            "colorfulness": colorfulness(images).cpu(),
            "roundtrip_agreement": token_agreement(tokens, self.encode(images)),
            "roundtrip_real": roundtrip_agreement(real_codes, decode, self.encode),
            "features": self.features(images),
            "codes": tokens.cpu(),
            "verdicts": [score_image(image, spec) for image, spec in zip(pixels, self.specs[first:last])],
            "preview": images[: max(0, preview - first)].cpu(),
        }


def metrics_table(metrics: dict, label: str) -> str:
    """A one-row markdown table of the headline metrics, headed by `label` (the model evaluated)."""
    header = "| model | " + " | ".join(TABLE_COLUMNS) + " |"
    rule = "|---" * (len(TABLE_COLUMNS) + 1) + "|"
    row = f"| {label} | " + " | ".join(fmt.format(metrics[key]) for key, fmt in TABLE_COLUMNS.items()) + " |"
    return "\n".join([header, rule, row]) + "\n"


def evaluate_to_dir(
    *, out_dir: str | Path, model: ModelChoice = ModelChoice(), n: int = 1000, seed: int = 0, batch_size: int = 64
) -> dict:
    """`ranke eval`: evaluate the chosen toy-world `model` (`ranke.sample_folder.load_backbone`) and
    write `out_dir/metrics.json`, `metrics.md` (one-row table) and `samples.png` (the first 64 images)."""
    backbone, cfg = load_backbone(model)
    if cfg.backbone.kind != "toy":
        raise UserError(
            f"--protocol toy scores toy-world models with the toy judges; backbone.kind={cfg.backbone.kind} "
            f"is evaluated with --protocol coco30k or hpsv2"
        )
    claim_output_dir(out_dir)  # the main process locks it, once the command is accepted
    # Every decoder choice shares the base tokenizer's encoder and codebook (the frozen token space).
    evaluator = Evaluator(
        cfg, backbone.device, n=n, seed=seed, batch_size=batch_size, sampling=cfg.sampling,
        tokenizer=backbone.tokenizer, split_over_processes=True,
    )  # fmt: skip
    metrics = evaluator(backbone)
    metrics.update(ckpt=model.checkpoint or "committed toy assets", policy=model.policy, decoder=model.decoder)
    if not _is_main_process():
        return metrics
    out = Path(out_dir)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    label = f"{metrics['ckpt']} (policy {model.policy}, decoder {model.decoder}, cfg {cfg.sampling.cfg_scale:g})"
    (out / "metrics.md").write_text(metrics_table(metrics, label))
    save_image_grid(evaluator.preview, out / "samples.png", nrow=8)
    return metrics


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process
