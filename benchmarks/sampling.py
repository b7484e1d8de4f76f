"""Sampling speed of the policy: images/s, tokens/s, achieved GFLOP/s against the measured fp32
matmul peak, and the KV-cache speedup over recomputing the full sequence at every step.

    python benchmarks/sampling.py            # toy preset and GPT-B (256 tokens), batches 1, 16, 64
    python benchmarks/sampling.py --quick    # fewer repetitions, GPT-B at batches 1 and 16 only

Weights are random (speed does not depend on their values). Every run uses CFG (two rows per
image), temperature 1 and top-k 1000, as the post-training rollouts do. FLOPs are counted
analytically: the linear layers (2 * in * out per position) plus attention (4 * dim per key per
position, causal), the output head only where logits are needed.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ranke.models.gpt import GPT_PRESETS, GPTArgs, Transformer
from ranke.precision import machine_description
from ranke.sampling import SamplingConfig, generate

CFG_SCALE, TOP_K = 4.0, 1000


def matmul_peak_gflops(size: int, repeats: int) -> float:
    """Best fp32 torch.matmul throughput on square matrices: the machine's practical peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def position_flops(args: GPTArgs, keys: int) -> float:
    """FLOPs of the transformer blocks for one position that attends to `keys` positions."""
    kv_dim = args.kv_heads * args.head_dim
    linear = 2 * args.dim * (args.dim + 2 * kv_dim) + 2 * args.dim * args.dim + 3 * 2 * args.dim * args.ffn_hidden_dim
    attention = 4 * args.dim * keys
    return args.n_layer * (linear + attention)


def generate_flops(args: GPTArgs, rows: int) -> float:
    """FLOPs of one KV-cache generate call over `rows` sequences (CFG rows included)."""
    text, head = args.cls_token_num, 2 * args.dim * args.vocab_size
    caption = 2 * (args.caption_dim * args.dim + args.dim * args.dim)
    prefill = sum(caption + position_flops(args, i + 1) for i in range(text)) + head
    decode = sum(position_flops(args, p + 1) + head for p in range(text, text + args.block_size - 1))
    return rows * (prefill + decode)


def random_model(args: GPTArgs) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(args).eval()
    torch.nn.init.normal_(model.output.weight, std=args.initializer_range)  # LlamaGen zero-inits it
    return model


def captions(args: GPTArgs, batch: int) -> torch.Tensor:
    return torch.randn(batch, args.cls_token_num, args.caption_dim, generator=torch.Generator().manual_seed(1))


def time_generate(model: Transformer, batch: int, repeats: int, use_kv_cache: bool = True) -> tuple[float, float]:
    """Best wall time and best process CPU time of one generate call (seconds). On a shared
    machine the CPU time shows what the code achieves while it actually holds the cores."""
    text = captions(model.args, batch)
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        generate(model, text, None, SamplingConfig(cfg_scale=CFG_SCALE, top_k=TOP_K),
                 generator=torch.Generator().manual_seed(0), use_kv_cache=use_kv_cache)
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def recompute_seconds(model: Transformer, batch: int, probes: int) -> float:
    """Time of a full-recompute generate, from `probes` timed steps spread over the sequence and
    linearly interpolated over all steps (a recompute step costs a forward over text + t tokens)."""
    args = model.args
    text = captions(args, 2 * batch)
    steps = sorted({round(i * (args.block_size - 1) / (probes - 1)) for i in range(probes)})
    timed = []
    with torch.inference_mode():
        for t in steps:
            tokens = torch.randint(0, args.vocab_size, (2 * batch, t))
            start = time.perf_counter()
            model.next_token_logits(text, tokens)
            timed.append(time.perf_counter() - start)
    total = 0.0
    for (t0, s0), (t1, s1) in zip(zip(steps, timed), zip(steps[1:], timed[1:])):
        total += sum(s0 + (s1 - s0) * (t - t0) / (t1 - t0) for t in range(t0, t1))
    return total + timed[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run: 1 repetition, GPT-B at batch 1 and 16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", default="toy,GPT-B", help="comma-separated subset of toy,GPT-B")
    parser.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes (images)")
    options = parser.parse_args()
    chosen = options.models.split(",")
    torch.set_num_threads(options.threads)
    repeats = 1 if options.quick else 2

    peak = matmul_peak_gflops(2048, 5 if options.quick else 20)
    print(f"machine: {machine_description()} (other processes share the CPUs)")
    print(f"fp32 matmul peak (2048^3 torch.matmul, best of runs): {peak:.1f} GFLOP/s\n")

    models = {name: GPT_PRESETS[name] for name in ("toy", "GPT-B") if name in chosen}
    print(f"Throughput (KV cache, CFG {CFG_SCALE}: 2 rows per image, top-k {TOP_K}, fp32). GFLOP/s over wall")
    print("time, and over CPU time / threads (the rate while holding the cores):\n")
    print("| model | tokens | batch | seconds | images/s | tokens/s | GFLOP/s wall | % of peak | GFLOP/s CPU | % of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, args in models.items():
        model = random_model(args)
        time_generate(model, 1, 1)  # warm-up
        batches = [int(b) for b in options.batches.split(",")]
        if options.quick and name == "GPT-B":
            batches = [b for b in batches if b <= 16]
        for batch in batches:
            wall, cpu = time_generate(model, batch, repeats)
            flops = generate_flops(args, 2 * batch) / 1e9
            on_cores = flops / (cpu / options.threads)
            print(f"| {name} | {args.block_size} | {batch} | {wall:.2f} | {batch / wall:.2f} | "
                  f"{batch * args.block_size / wall:.0f} | {flops / wall:.1f} | {100 * flops / wall / peak:.0f}% | "
                  f"{on_cores:.1f} | {100 * on_cores / peak:.0f}% |", flush=True)

    print("\nKV cache vs full recompute at every step (same settings):\n")
    print("| model | tokens | batch | KV cache s | recompute s | how recompute was timed | speedup |")
    print("|---|---|---|---|---|---|---|")
    speedups = [("toy", 16, None), ("GPT-B", 1, 5 if options.quick else 9)]
    if not options.quick:
        speedups.append(("GPT-B", 16, 5))
    for name, batch, probes in [item for item in speedups if item[0] in models]:
        model = random_model(models[name])
        cached = time_generate(model, batch, repeats)[0]
        if probes is None:
            recompute, how = time_generate(model, batch, 1, use_kv_cache=False)[0], "measured"
        else:
            recompute, how = recompute_seconds(model, batch, probes), f"{probes} steps timed, interpolated"
        print(f"| {name} | {model.args.block_size} | {batch} | {cached:.2f} | {recompute:.1f} | {how} | "
              f"{recompute / cached:.0f}x |", flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
