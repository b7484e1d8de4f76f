"""Toy post-training with and without a LoRA adapter on the policy: step time, peak memory, what
trains and what a checkpoint's policy file holds.

    python benchmarks/lora.py                         # toy preset, mode=policy, 12 steps each
    python benchmarks/lora.py --steps 20 mode=both posttrain.lora.rank=8

Each setting runs the real recipe (`ranke.train.posttrain.train_posttrain`) from the committed toy
assets in a process of its own, so that each peak is its own: on a CPU the peak resident set size
of that process (`ru_maxrss`: the interpreter, torch and the data as well as the models), on a GPU
the allocator's peak (`torch.cuda.max_memory_allocated`). Step time is the median of
`time/step` after the first `--warmup` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from ranke.precision import machine_description
from ranke.train.posttrain import train_posttrain

SETTINGS = {"whole policy": [], "LoRA": ["posttrain.lora.enabled=true"]}


def run_one(out: Path, steps: int, warmup: int, overrides: list[str]) -> dict:
    """One run in this process; its figures as a dict."""
    train_posttrain("toy", str(out), [f"steps={steps}", "grid_every=100000", "eval_samples=0", f"save_every={steps}",
                                      *overrides])  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][warmup:]
    policy_file = out / "checkpoints" / f"step_{steps:06d}" / "policy.safetensors"
    on_gpu = torch.cuda.is_available()
    return {
        "step_seconds": statistics.median(row["time/step"] for row in rows),
        "peak_mib": (torch.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        / 2**20,
        "peak_measure": "allocator peak (GPU)" if on_gpu else "peak RSS of the process",
        "checkpointed_policy_tensors": sum(tensor.numel() for tensor in load_file(policy_file).values()),
        "policy_file_mib": policy_file.stat().st_size / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting in this process, print JSON
    parser.add_argument("overrides", nargs="*", help="posttrain config overrides for both settings (default mode=policy)")
    args = parser.parse_args()
    os.environ.setdefault("RANKE_NO_PROGRESS", "1")
    overrides = ["mode=policy", *args.overrides]
    if args.one:
        print(json.dumps(run_one(Path(args.one), args.steps, args.warmup, overrides)))
        return
    print(f"machine: {machine_description()}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in SETTINGS.items():
            command = [sys.executable, __file__, "--one", str(Path(tmp) / name.replace(" ", "_")),
                       f"--steps={args.steps}", f"--warmup={args.warmup}", *overrides, *extra]  # fmt: skip
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[name] = json.loads(output.strip().splitlines()[-1])
    print(f"\nsettings: {' '.join(overrides)}; median of steps {args.warmup + 1}-{args.steps}")
    print(f"| policy | s/step | peak MiB ({results['LoRA']['peak_measure']}) | checkpointed policy tensors | policy file MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, result in results.items():
        print(f"| {name} | {result['step_seconds']:.3f} | {result['peak_mib']:.0f} | "
              f"{result['checkpointed_policy_tensors']:,} | {result['policy_file_mib']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
