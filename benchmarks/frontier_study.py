"""The frontier study (docs/results.md, "Where does GRPO's reward start to cost fidelity?"): GRPO
and RankE at two levels of optimisation pressure, five paired seeds, 400 steps, fp32, evaluated
every 50 steps on the 500 held-out prompts; its plan was committed before any of these runs.

    OMP_NUM_THREADS=1 python benchmarks/frontier_study.py --out runs/frontier --workers 2   # runs (resumable)
    python benchmarks/frontier_study.py --out runs/frontier --table                         # what has finished

Levels: `clip` (the toy reward alone, the preset's lr 5e-5) and `colorful` (the toy reward plus the
colorfulness term 1:1, a direction other than realism, the same lr): chosen on the validation
sweep (`benchmarks/grpo_sweep.py --sweep frontier`). Runs go to OUT/runs/<level>_<method>_seed<s>,
seed by seed, so that the seeds finished are complete pairs; the primary level runs first, with the
plan's mechanism runs (OUT/runs/colorful_adapted_seed<s>) as soon as their GRPO policies exist. `--table` prints, per level, the
fidelity metrics of RankE - GRPO at matched reward gain (the plan's primary comparison at
`colorful`) and the reward-fidelity figure OUT/frontier_<level>.png, then the mechanism's tables
(frozen vs adapted decoder, and the adapted decoder's FD gain split) and OUT/mechanism.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ranke import config as config_lib
from ranke.backbones import load_toy_backbone
from ranke.config import RunConfig
from ranke.demo import ADAPTED, decoder_mechanism, export_final_policy
from ranke.eval.evaluate import Evaluator
from ranke.eval.figures import plot_decoder_mechanism, plot_frontier
from ranke.eval.frontier import decoder_gain_parts
from ranke.eval.runs import metric_by_seed, run_seed
from ranke.eval.study import Method, MethodSpec
from ranke.eval.tables import comparison_table, difference_cell, frontier_table
from ranke.runtime import autocast, select_device
from ranke.workers import Job, run_jobs

COMMON = ("precision=fp32", "eval_every=50", "save_every=50", "eval_samples=500", "eval_split=heldout", "grid_every=100000")
STEPS = 400
LEVELS = {"clip": (), "colorful": ("rewards={toy_clip: 1.0, colorfulness: 1.0}",)}
METHODS = {"grpo": MethodSpec("GRPO", ("mode=policy",), "base"), "ranke": MethodSpec("RankE", ("mode=both",), "ema")}
SEEDS = (0, 1, 2, 3, 4)
# The mechanism at the primary level: the decoder stage alone (the preset's 150 steps) on the final
# policies of the GRPO runs of seeds 0-2, so the same tokens meet the frozen and an adapted decoder.
MECHANISM_LEVEL, MECHANISM_SEEDS, MECHANISM_STEPS = "colorful", (0, 1, 2), 150


def run_dir(out: Path, level: str, method: str, seed: int) -> Path:
    return out / "runs" / f"{level}_{method}_seed{seed}"


def level_jobs(out: Path, level: str, seeds: tuple[int, ...]) -> list[Job]:
    """GRPO's and RankE's runs at `level`, seed by seed (a stopped study leaves complete pairs)."""
    return [
        Job(run_dir(out, level, method, seed), (*COMMON, f"steps={STEPS}", *LEVELS[level], *spec.overrides, f"seed={seed}"))
        for seed in seeds for method, spec in METHODS.items()
    ]  # fmt: skip


def mechanism_jobs(out: Path) -> list[Job]:
    """The decoder stage alone on each finished GRPO run's final policy at the mechanism level."""
    jobs = []
    for seed in MECHANISM_SEEDS:
        policy = export_final_policy(run_dir(out, MECHANISM_LEVEL, "grpo", seed)).resolve()
        settings = (*COMMON, f"steps={MECHANISM_STEPS}", *LEVELS[MECHANISM_LEVEL], *ADAPTED.overrides)
        jobs.append(Job(run_dir(out, MECHANISM_LEVEL, "adapted", seed), (*settings, f"policy={policy}", f"seed={seed}")))
    return jobs


def run_study(out: Path, config: str, workers: int, threads: int) -> None:
    """Every run of the plan, the primary level first: its seeds 0-2, their mechanism runs (which
    need those GRPO policies), its seeds 3-4, then the other level. Finished runs are skipped and
    stopped ones continue from their latest checkpoint."""
    rest = tuple(seed for seed in SEEDS if seed not in MECHANISM_SEEDS)
    run_jobs(level_jobs(out, MECHANISM_LEVEL, MECHANISM_SEEDS), config, workers, threads)
    run_jobs(mechanism_jobs(out), config, workers, threads)
    run_jobs(level_jobs(out, MECHANISM_LEVEL, rest), config, workers, threads)
    for level in LEVELS:
        if level != MECHANISM_LEVEL:
            run_jobs(level_jobs(out, level, SEEDS), config, workers, threads)


def held_out_evaluator(config: str) -> tuple[Evaluator, RunConfig, torch.device]:
    """The runs' own in-loop evaluation: the held-out prompts, their number and sampling seed."""
    cfg = config_lib.load(RunConfig, config, list(COMMON), section="posttrain")
    device = select_device(cfg.device)
    return Evaluator(cfg, device, n=cfg.posttrain.eval_samples, seed=cfg.posttrain.eval_seed), cfg, device


def sft_start(out: Path, config: str) -> dict:
    """The SFT policy's metrics on the same held-out prompts, sampling seed and precision, and how
    its (base) decoder renders the real images' ground-truth codes (cached)."""
    path = out / "sft_heldout.json"
    if not path.is_file() or "recon_fd" not in json.loads(path.read_text()):
        evaluator, cfg, device = held_out_evaluator(config)
        backbone, _ = load_toy_backbone(cfg.posttrain.policy, cfg.posttrain.tokenizer, device)
        with autocast(device, "fp32"):
            metrics = {**evaluator(backbone), **evaluator.reconstruction(backbone.tokenizer)}
            path.write_text(json.dumps({**metrics, "real": evaluator.real_reference()}, indent=2))
    return json.loads(path.read_text())


def level_methods(out: Path, level: str) -> list[Method]:
    """GRPO's and RankE's runs at `level` that have evaluations so far."""
    methods = []
    for method, spec in METHODS.items():
        runs = [run_dir(out, level, method, seed) for seed in SEEDS]
        methods.append(Method(spec, [run for run in runs if (run / "eval.jsonl").is_file()]))
    return methods


def mechanism_report(out: Path, config: str, sft: dict, frozen: Method) -> None:
    """Frozen vs adapted decoder on the same final GRPO policies, and the adapted decoder's FD gain
    split into its real-code part and its policy-token part (`decoder_gain_parts`)."""
    runs = [run_dir(out, MECHANISM_LEVEL, "adapted", seed) for seed in MECHANISM_SEEDS]
    adapted = Method(ADAPTED, [run for run in runs if (run / "eval.jsonl").is_file()])
    if not adapted.runs:
        return
    cached = out / "mechanism.json"
    reconstruction = json.loads(cached.read_text()) if cached.is_file() else {}
    if set(reconstruction) != {run.name for run in adapted.runs}:
        evaluator, _, device = held_out_evaluator(config)
        with autocast(device, "fp32"):
            reconstruction = decoder_mechanism(evaluator, [adapted], device)
        cached.write_text(json.dumps(reconstruction, indent=2))
    print(f"\n## mechanism at {MECHANISM_LEVEL}: {len(adapted.runs)} final GRPO policies, frozen vs adapted decoder\n")
    print(comparison_table(adapted, frozen))
    real_fd = {run_seed(run): reconstruction[run.name]["recon_fd"] for run in adapted.runs}
    parts = decoder_gain_parts(metric_by_seed(frozen, "fd"), metric_by_seed(adapted, "fd"), sft["recon_fd"], real_fd)
    print("| adapted decoder's FD gain (positive = better) | mean [95% interval] | seeds |\n|---|---|---|")
    for name, interval in (("on the policy's tokens", parts.on_policy_tokens), ("on the real images' codes", parts.on_real_codes),
                           ("specific to the policy's tokens", parts.specific_to_policy)):  # fmt: skip
        print(f"| {name} | {difference_cell(interval, '{:.1f}')} | {interval.n} |")
    print(plot_decoder_mechanism(frozen, adapted, reconstruction, sft, out / "mechanism.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/frontier")
    parser.add_argument("--config", default="toy")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="only the tables and figures of what has finished")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        run_study(out, args.config, args.workers, args.threads)
    sft = sft_start(out, args.config)
    for level in LEVELS:
        grpo, ranke = level_methods(out, level)
        if grpo.runs and ranke.runs:
            print(f"\n## {level}: {len(grpo.runs)} GRPO and {len(ranke.runs)} RankE runs\n")
            print(frontier_table(sft, [(ranke, grpo)]))
            print(comparison_table(ranke, grpo))
            print(plot_frontier(sft, [grpo, ranke], out / f"frontier_{level}.png", sft["real"]))
        if level == MECHANISM_LEVEL and grpo.runs:
            mechanism_report(out, args.config, sft, grpo)


if __name__ == "__main__":
    main()
