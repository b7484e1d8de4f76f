"""Post-training step time: standard GRPO (`mode=policy`) vs RankE (`mode=both`) on the same
settings, with the split into rollout / log-probs / decode / reward / policy update / decoder stage.

    python benchmarks/posttrain_step.py                      # toy preset, 12 steps per mode
    python benchmarks/posttrain_step.py --steps 20 --threads 1 prompts_per_step=8

Each mode runs the real recipe (`ranke.train.posttrain.train_posttrain`) from the committed
toy assets into a temporary directory; the first `--warmup` steps are dropped and the median
of the rest is reported. The decoder stage runs with its discriminator on from the start
(`disc_start=0`), its most expensive configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from ranke.train.posttrain import train_posttrain
from ranke.precision import machine_description

PARTS = ("rollout", "logprobs", "decode", "reward", "update", "decoder", "step")


def median_split(metrics_path: Path, warmup: int) -> dict[str, float]:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()][warmup:]
    return {part: statistics.median(row.get(f"time/{part}", 0.0) for row in rows) for part in PARTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("overrides", nargs="*", help="extra posttrain config overrides")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("RANKE_NO_PROGRESS", "1")
    print(f"machine: {machine_description()}")

    splits = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("policy", "both"):
            overrides = [f"mode={mode}", f"steps={args.steps}", "disc_start=0", "grid_every=100000", "eval_samples=0",
                         "save_every=100000", *args.overrides]  # fmt: skip
            train_posttrain("toy", str(Path(tmp) / mode), overrides)
            splits[mode] = median_split(Path(tmp) / mode / "metrics.jsonl", args.warmup)

    print(f"\nmedian seconds per step over steps {args.warmup + 1}-{args.steps} (load average {os.getloadavg()[0]:.1f})")
    print("| mode | " + " | ".join(PARTS) + " |")
    print("|---" * (len(PARTS) + 1) + "|")
    for mode, split in splits.items():
        print(f"| {mode} | " + " | ".join(f"{split[part]:.3f}" for part in PARTS) + " |")
    ratio = splits["both"]["step"] / splits["policy"]["step"]
    print(f"\nRankE step / GRPO step = {ratio:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
