"""Which precision is faster on this CPU: one linear layer at the policy's shape in fp32 and under
bf16 autocast, and what `precision=auto` chooses (ranke.precision).

    python benchmarks/precision.py                                   # this CPU as it is
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/precision.py   # an AVX2 laptop

Times are medians of repeated products ([256, width] @ [width, 4 width]) with the torch threads
given; the ratio is what `auto` compares with its 1.1x threshold (it measures at the run's width
and caches the answer; this script always measures afresh).
"""

from __future__ import annotations

import argparse

import torch

from ranke.precision import MEASURED_TOKENS, choose_precision, machine_description, measure_bf16_speedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="*", default=[192, 768, 2048], help="policy widths (toy 192, GPT-B 768)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine_description()}")
    print("\n| width | product | bf16 / fp32 speed | auto chooses |\n|---|---|---|---|")
    for width in args.widths:
        speedup = measure_bf16_speedup(width)
        choice = choose_precision("auto", torch.device("cpu"), width, bf16_speedup=lambda _: speedup)
        print(f"| {width} | [{MEASURED_TOKENS}, {width}] @ [{width}, {4 * width}] | {speedup:.2f}x | {choice.name} |")


if __name__ == "__main__":
    main()
