"""GRPO trajectories charted against steps on the VALIDATION prompts (never the held-out evaluation
prompts), seed 0. Three sweeps:

* `preset` (default): the settings that decided the toy baseline (policy lr, rollouts per step,
  KL coefficient, GRPO passes per batch), in bf16, up to 300 steps.
* `frontier`: the candidate levels of optimisation pressure for the frontier study (issue: where
  does GRPO's reward start to cost fidelity?): longer horizons, a higher rate, no KL anchor, a
  reward with a direction other than realism; fp32 throughout, 400 steps.
* `pixel`: VA-π's policy learning rate in the toy world (`mode=pixel` with the paper's other
  settings, `ranke.demo.PIXEL`), at the preset's 150 steps, in bf16: the paper's 1e-6 is for a
  775M-parameter policy, the toy preset's GRPO rate is 5e-5.

    python benchmarks/grpo_sweep.py --out runs/sweep --workers 2                      # runs (resumable) + chart
    python benchmarks/grpo_sweep.py --sweep frontier --out runs/frontier_sweep        # the frontier's levels
    python benchmarks/grpo_sweep.py --sweep pixel --out runs/pixel_sweep              # VA-π's learning rate
    python benchmarks/grpo_sweep.py --out runs/sweep --plot-only                      # chart what has finished

Each setting is `ranke posttrain mode=policy` from the committed toy SFT policy with an evaluation
of 500 validation prompts every 50 steps; runs go to OUT/<setting>, the chart to OUT/grpo_sweep.png
(and --figure), the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ranke import config as config_lib  # noqa: E402
from ranke.backbones import load_toy_backbone  # noqa: E402
from ranke.config import RunConfig  # noqa: E402
from ranke.demo import PIXEL  # noqa: E402
from ranke.eval.evaluate import Evaluator  # noqa: E402
from ranke.runtime import autocast, select_device  # noqa: E402
from ranke.workers import Job, run_jobs  # noqa: E402

COMMON = (
    "mode=policy", "eval_split=validation", "eval_samples=500", "eval_every=50",
    "save_every=50", "grid_every=100000", "seed=0",
)  # fmt: skip
# sweep -> (its precision, {setting -> overrides}); 64 rollouts per step (8 prompts x 8) unless stated
PRESET_SETTINGS = {
    "lr1e-4": ("policy_lr=1e-4", "steps=100"),
    "lr2e-5": ("policy_lr=2e-5", "steps=200"),
    "lr5e-5": ("policy_lr=5e-5", "steps=300"),
    "lr5e-5_128rollouts": ("policy_lr=5e-5", "prompts_per_step=16", "steps=200"),
    "lr5e-5_2epochs": ("policy_lr=5e-5", "grpo_epochs=2", "steps=200"),
    "lr5e-5_kl0": ("policy_lr=5e-5", "kl_coef=0", "steps=200"),
}
COLORFUL = "rewards={toy_clip: 1.0, colorfulness: 1.0}"
FRONTIER_SETTINGS = {
    "lr5e-5_400": ("policy_lr=5e-5", "steps=400"),
    "lr1e-4_400": ("policy_lr=1e-4", "steps=400"),
    "lr5e-5_kl0_400": ("policy_lr=5e-5", "kl_coef=0", "steps=400"),
    "lr5e-5_color_400": ("policy_lr=5e-5", COLORFUL, "steps=400"),
    "lr1e-4_color_400": ("policy_lr=1e-4", COLORFUL, "steps=400"),
    "lr5e-5_128rollouts_300": ("policy_lr=5e-5", "prompts_per_step=16", "steps=300"),
}
PIXEL_SETTINGS = {f"pixel_lr{lr}": (*PIXEL.overrides, f"policy_lr={lr}", "steps=150") for lr in ("5e-5", "1e-5", "2e-6")}
SWEEPS = {"preset": ("bf16", PRESET_SETTINGS), "frontier": ("fp32", FRONTIER_SETTINGS), "pixel": ("bf16", PIXEL_SETTINGS)}
PANELS = (("reward", "reward (train toy CLIP)"), ("clip_score", "CLIP score (eval toy CLIP)"),
          ("fd", "FD (toy features)"), ("token_kl", "token KL (nats)"))  # fmt: skip


def sft_validation(out: Path, config: str, common: tuple[str, ...]) -> dict:
    """The SFT start's metrics on the same validation prompts and sampling seed (cached)."""
    path = out / "sft_validation.json"
    if not path.is_file():
        cfg = config_lib.load(RunConfig, config, list(common), section="posttrain")
        device = select_device(cfg.device)
        backbone, _ = load_toy_backbone(cfg.posttrain.policy, cfg.posttrain.tokenizer, device)
        evaluator = Evaluator(cfg, device, n=cfg.posttrain.eval_samples, seed=cfg.posttrain.eval_seed, split="validation")
        with autocast(device, cfg.precision):  # as the runs' own evaluations
            path.write_text(json.dumps(evaluator(backbone), indent=2))
    return json.loads(path.read_text())


def read_trajectory(run: Path) -> list[dict]:
    path = run / "eval.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return sorted(rows, key=lambda row: row["step"])


def chart(out: Path, sft: dict, settings: dict, precision: str, figure: Path | None) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.2))
    for axis, (key, title) in zip(axes.flat, PANELS):
        for name in settings:
            rows = read_trajectory(out / name)
            if rows:
                axis.plot([0] + [r["step"] for r in rows], [sft[key]] + [r[key] for r in rows], marker="o", ms=3, label=name)
        axis.axhline(sft[key], color="grey", ls="--", lw=1, label="SFT start")
        axis.set_xlabel("post-training step")
        axis.set_ylabel(title)
        axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"GRPO (frozen decoder, {precision}) on 500 validation prompts, seed 0; 64 rollouts/step unless named")
    fig.tight_layout()
    fig.savefig(out / "grpo_sweep.png", dpi=110)
    if figure is not None:
        figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "grpo_sweep.png", figure)
    plt.close(fig)


def table(out: Path, sft: dict, settings: dict) -> str:
    lines = ["| setting | step | reward | CLIP score | FD | token KL | verifier |", "|---|---|---|---|---|---|---|"]
    lines.append(f"| SFT | 0 | {sft['reward']:.2f} | {sft['clip_score']:.2f} | {sft['fd']:.1f} | {sft['token_kl']:.3f} | {sft['verifier_accuracy']:.3f} |")
    for name in settings:
        for r in read_trajectory(out / name):
            lines.append(
                f"| {name} | {r['step']} | {r['reward']:.2f} | {r['clip_score']:.2f} | {r['fd']:.1f} | "
                f"{r['token_kl']:.3f} | {r['verifier_accuracy']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=SWEEPS, default="preset")
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--config", default="toy")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="settings to run (default: all)")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--figure", type=Path, help="also copy the chart here (e.g. docs/figures/grpo_sweep.png)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    precision, settings = SWEEPS[args.sweep]
    common = (*COMMON, f"precision={precision}")
    if not args.plot_only:
        names = args.only or list(settings)
        jobs = [Job(out / name, (*common, *settings[name])) for name in names]
        seconds = run_jobs(jobs, args.config, args.workers, args.threads)
        for run, s in seconds.items():
            print(f"{run.name}: {s / 60:.1f} min")
    sft = sft_validation(out, args.config, common)
    chart(out, sft, settings, precision, args.figure)
    print(table(out, sft, settings))


if __name__ == "__main__":
    main()
