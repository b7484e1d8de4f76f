"""Loss-term mutants of the post-training step's wiring (docs/testing.md).

mutmut covers the pure losses in `ranke/algo/`; the recipe's tests build a run, far too slow to
try mutmut's hundreds of mutants of `ranke/train/posttrain.py`. This script applies each mutant
below that drops a loss term or gives it another weight, one at a time in a copy of the tree,
runs the recipe's wiring tests on it and prints whether they fail (killed) or pass (survived).

    python tools/loss_term_mutants.py [--jobs 2]

Exit code 1 when a mutant survives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POSTTRAIN = "ranke/train/posttrain.py"
TESTS = [
    "tests/test_posttrain.py",
    "-k",
    "method_sum or weighted_sum_of_its_logged_terms or surrogate_plus_kl_coef or ramps_from_zero",
]

# (what the mutant does, file, text, replacement): the text occurs exactly once in the file.
MUTANTS = [
    ("L_recon weight ignored", POSTTRAIN, "recon=pcfg.recon_weight,", "recon=1.0,"),
    ("L_rankgan weight ignored", POSTTRAIN, "rank_gan=pcfg.rank_gan_weight,", "rank_gan=1.0,"),
    ("lambda_d ignored", POSTTRAIN, "disc_weight=pcfg.disc_weight,", "disc_weight=1.0,"),
    ("lambda_c unscheduled", POSTTRAIN, "consistency=lambda_c,", "consistency=pcfg.consistency_weight,"),
    ("L_consist dropped", POSTTRAIN, "consistency=lambda_c,", "consistency=0.0,"),
    ("L_reward weight ignored", POSTTRAIN, "reward=pcfg.reward_backprop_weight,", "reward=1.0,"),
    ("L_soft weight ignored", POSTTRAIN, "soft=pcfg.soft_token_weight,", "soft=1.0,"),
    ("L_soft never computed", POSTTRAIN, "if pcfg.soft_token_weight > 0:", "if pcfg.soft_token_weight > 1:"),
    ("discriminator delay ignored", POSTTRAIN, "disc_factor = adopt_weight(step, pcfg.disc_start)", "disc_factor = 1.0"),
    (
        "LPIPS weight dropped from L_recon",
        POSTTRAIN,
        "pixel, perceptual_recon, generator, generator_weight, pcfg.perceptual_weight, pcfg.disc_weight, disc_factor",
        "pixel, perceptual_recon, generator, generator_weight, 1.0, pcfg.disc_weight, disc_factor",
    ),
    (
        "lambda_d dropped from L_recon",
        POSTTRAIN,
        "generator_weight, pcfg.perceptual_weight, pcfg.disc_weight, disc_factor",
        "generator_weight, pcfg.perceptual_weight, 1.0, disc_factor",
    ),
    (
        "adaptive GAN weight without LPIPS",
        POSTTRAIN,
        "pixel + pcfg.perceptual_weight * perceptual_recon, generator, vq.last_layer",
        "pixel, generator, vq.last_layer",
    ),
    ("adaptive GAN weight dropped", POSTTRAIN, "generator, generator_weight, pcfg.perceptual_weight", "generator, 1.0, pcfg.perceptual_weight"),
    ("L_rankgan unweighted by rank", POSTTRAIN, "disc(decoded).float(), selection.weights)", "disc(decoded).float(), torch.ones_like(selection.weights))"),
    ("L_reward unweighted by rank", POSTTRAIN, "reward_values, selection.weights.to(reward_values.device)", "reward_values, torch.ones_like(reward_values)"),
    ("KL anchor dropped", POSTTRAIN, "beta=pcfg.kl_coef,", "beta=0.0,"),
    ("KL anchor weight ignored", POSTTRAIN, "beta=pcfg.kl_coef,", "beta=1.0,"),
]


def try_mutant(mutant: tuple[str, str, str, str]) -> tuple[str, bool]:
    name, path, text, replacement = mutant
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(ROOT / "ranke", tree / "ranke")
        shutil.copytree(ROOT / "tests", tree / "tests")
        source = (tree / path).read_text()
        if source.count(text) != 1:
            raise SystemExit(f"mutant '{name}': its text occurs {source.count(text)} times in {path}, not once")
        (tree / path).write_text(source.replace(text, replacement))
        env = {**os.environ, "PYTHONPATH": str(tree), "RANKE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
            cwd=tree, env=env, capture_output=True, text=True,
        )  # fmt: skip
        return name, result.returncode != 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="mutants tried at once")
    args = parser.parse_args()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(try_mutant, MUTANTS))
    for name, killed in results:
        print(f"{'killed  ' if killed else 'SURVIVED'}  {name}")
    survivors = sum(not killed for _, killed in results)
    print(f"{len(results) - survivors}/{len(results)} loss-term mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
