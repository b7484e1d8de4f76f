"""How much fidelity the toy decoder loses on tokens off the real-code manifold.

The frontier study (docs/results.md) found GRPO's tokens shift a little (round-trip agreement 0.017
below the SFT policy's) at no FD cost, and a co-evolved decoder repairing nothing. Whether that is
because the shift is small or because the toy decoder renders off-manifold tokens about as well as
real ones is what this measures: the held-out real images' own codes, a fraction p of the positions
replaced (`uniform`: by a random code; `nearest`: by the code whose embedding is nearest to the
original's, a small error), decoded by the base decoder and by each run's EMA decoder given with
--run, then FD to the real images (toy features) and round-trip agreement.

    python benchmarks/decoder_sensitivity.py [--run runs/frontier/runs/colorful_ranke_seed0 ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ranke import config as config_lib
from ranke.config import RunConfig
from ranke.eval.evaluate import Evaluator, decode_8bit
from ranke.eval.fid import frechet_distance_from_features
from ranke.eval.shift import token_agreement
from ranke.models.vq import VQModel
from ranke.precision import machine_description
from ranke.runtime import select_device
from ranke.sample_folder import ModelChoice, load_backbone


def substitutes(codebook: torch.Tensor, kind: str, codes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A replacement code for every position of `codes`: a uniform random code, or the code whose
    embedding is nearest to the original's (itself excluded)."""
    if kind == "uniform":
        return torch.randint(len(codebook), codes.shape, generator=generator)
    distances = torch.cdist(codebook, codebook)
    distances.fill_diagonal_(float("inf"))
    return distances.argmin(dim=1)[codes]


def corrupted(codes: torch.Tensor, fraction: float, replacement: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`codes` with each position replaced by `replacement` with probability `fraction`."""
    replaced = torch.rand(codes.shape, generator=generator) < fraction
    return torch.where(replaced, replacement, codes)


def fidelity(evaluator: Evaluator, decoder: VQModel, codes: torch.Tensor) -> tuple[float, float]:
    """FD of the decoded, 8-bit `codes` to the real images, and their mean round-trip agreement
    (each chunk decoded once, for both)."""
    features, agreement = [], []
    for chunk in codes.split(evaluator.batch_size):
        images = decode_8bit(decoder, chunk.to(evaluator.device))
        features.append(evaluator.features(images))
        agreement.append(token_agreement(chunk, evaluator.encode(images)))
    return frechet_distance_from_features(np.concatenate(features), evaluator.real_features), float(torch.cat(agreement).mean())


def fraction_list(text: str) -> list[float]:
    """`--fractions`: comma-separated fractions in [0, 1]."""
    try:
        fractions = [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(0.0 <= fraction <= 1.0 for fraction in fractions):
        raise argparse.ArgumentTypeError(f"every fraction must lie in [0, 1], got {text!r}")
    return fractions


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], help="a post-training run whose EMA decoder is measured too")
    parser.add_argument("--n", type=int, default=500, help="held-out prompts (the study's 500)")
    parser.add_argument("--fractions", type=fraction_list, default="0,0.02,0.05,0.1,0.2", help="of the positions replaced")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = config_lib.load(RunConfig, "toy", ["precision=fp32"], section="posttrain")
    device = select_device(cfg.device)
    evaluator = Evaluator(cfg, device, n=args.n, seed=0)
    decoders = {"base": evaluator.tokenizer}
    for run in args.run:
        backbone, _ = load_backbone(ModelChoice(checkpoint=run, decoder="ema", overrides=(f"device={device}",)))
        decoders[Path(run).name] = backbone.tokenizer
    print(f"{machine_description()}\n")
    print("| corruption | fraction | " + " | ".join(f"FD, RT: {name}" for name in decoders) + " |")
    print("|---|---|" + "---|" * len(decoders))
    codes = evaluator.real_codes
    codebook = evaluator.tokenizer.codebook_vectors().cpu()
    for kind in ("uniform", "nearest"):
        for fraction in args.fractions:
            generator = torch.Generator().manual_seed(args.seed)
            replacement = substitutes(codebook, kind, codes, generator)
            changed = corrupted(codes, fraction, replacement, generator)
            cells = [f"{fd:.1f}, {agreement:.3f}" for fd, agreement in (fidelity(evaluator, d, changed) for d in decoders.values())]
            print(f"| {kind} | {fraction:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
