"""The frontier study (docs/results.md, "Where does GRPO's reward start to cost fidelity?"): GRPO
and RankE at two levels of optimisation pressure, five paired seeds, 400 steps, fp32, evaluated
every 50 steps on the 500 held-out prompts; its plan was committed before any of these runs.

    OMP_NUM_THREADS=1 python benchmarks/frontier_study.py --out runs/frontier --workers 2   # runs (resumable)
    ... --levels colorful clip     # the primary comparison's level first
    python benchmarks/frontier_study.py --out runs/frontier --table                         # what has finished

Levels: `clip` (the toy reward alone, the preset's lr 5e-5) and `colorful` (the toy reward plus the
colorfulness term 1:1, a direction other than realism, the same lr): chosen on the validation
sweep (`benchmarks/grpo_sweep.py --sweep frontier`). Runs go to OUT/runs/<level>_<method>_seed<s>,
seed by seed, so that the seeds finished are complete pairs. `--table` prints, per level, the
fidelity metrics of RankE - GRPO at matched reward gain (the plan's primary comparison at
`colorful`) and the reward-fidelity figure OUT/frontier_<level>.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ranke import config as config_lib
from ranke.backbones import load_toy_backbone
from ranke.config import RunConfig
from ranke.eval.evaluate import Evaluator
from ranke.eval.figures import plot_frontier
from ranke.eval.study import Method, MethodSpec
from ranke.eval.tables import comparison_table, frontier_table
from ranke.runtime import autocast, select_device
from ranke.workers import Job, run_jobs

COMMON = ("precision=fp32", "steps=400", "eval_every=50", "save_every=50", "eval_samples=500", "eval_split=heldout",
          "grid_every=100000")  # fmt: skip
LEVELS = {"clip": (), "colorful": ("rewards={toy_clip: 1.0, colorfulness: 1.0}",)}
METHODS = {"grpo": MethodSpec("GRPO", ("mode=policy",), "base"), "ranke": MethodSpec("RankE", ("mode=both",), "ema")}
SEEDS = (0, 1, 2, 3, 4)


def run_dir(out: Path, level: str, method: str, seed: int) -> Path:
    return out / "runs" / f"{level}_{method}_seed{seed}"


def study_jobs(out: Path, levels: list[str]) -> list[Job]:
    """The plan's runs at `levels`, level by level, seed by seed (a stopped study leaves complete
    pairs behind, of the first level first)."""
    return [
        Job(run_dir(out, level, method, seed), (*COMMON, *LEVELS[level], *spec.overrides, f"seed={seed}"))
        for level in levels for seed in SEEDS for method, spec in METHODS.items()
    ]  # fmt: skip


def sft_start(out: Path, config: str) -> dict:
    """The SFT policy's metrics on the same held-out prompts, sampling seed and precision (cached)."""
    path = out / "sft_heldout.json"
    if not path.is_file():
        cfg = config_lib.load(RunConfig, config, list(COMMON), section="posttrain")
        device = select_device(cfg.device)
        backbone, _ = load_toy_backbone(cfg.posttrain.policy, cfg.posttrain.tokenizer, device)
        evaluator = Evaluator(cfg, device, n=cfg.posttrain.eval_samples, seed=cfg.posttrain.eval_seed)
        with autocast(device, "fp32"):
            path.write_text(json.dumps({**evaluator(backbone), "real": evaluator.real_reference()}, indent=2))
    return json.loads(path.read_text())


def level_methods(out: Path, level: str) -> list[Method]:
    """GRPO's and RankE's runs at `level` that have evaluations so far."""
    methods = []
    for method, spec in METHODS.items():
        runs = [run_dir(out, level, method, seed) for seed in SEEDS]
        methods.append(Method(spec, [run for run in runs if (run / "eval.jsonl").is_file()]))
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/frontier")
    parser.add_argument("--config", default="toy")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--levels", nargs="+", choices=list(LEVELS), default=list(LEVELS),
                        help="the levels to run, in this order (default: all; the primary comparison is at colorful)")
    parser.add_argument("--table", action="store_true", help="only the tables and figures of what has finished")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        run_jobs(study_jobs(out, args.levels), args.config, args.workers, args.threads)
    sft = sft_start(out, args.config)
    for level in LEVELS:
        grpo, ranke = level_methods(out, level)
        if grpo.runs and ranke.runs:
            print(f"\n## {level}: {len(grpo.runs)} GRPO and {len(ranke.runs)} RankE runs\n")
            print(frontier_table(sft, [(ranke, grpo)]))
            print(comparison_table(ranke, grpo))
            print(plot_frontier(sft, [grpo, ranke], out / f"frontier_{level}.png", sft["real"]))


if __name__ == "__main__":
    main()
