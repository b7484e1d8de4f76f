"""Toy SFT step cost on a CPU: the attention kernels, and where a training step goes.

    python benchmarks/sft_step.py                   # torch's default threads, batch 32
    python benchmarks/sft_step.py --threads 1 --batch-size 64

1. One attention call of the toy policy's shape (6 heads, 68 positions, head size 32, causal
   mask with padded text keys), forward + backward, through PyTorch's fused CPU kernel and the
   math path, in fp32 and bf16. `ranke.models.gpt.Attention` takes the math path for bf16
   whole-sequence passes on a CPU because of the fused kernel's slow bf16 backward.
2. One SFT step of the toy preset as `ranke sft` runs it (toy stream batch, frozen committed
   tokenizer, policy under bf16 autocast), split into data, tokenizer encode, text encode,
   policy forward, backward and optimizer; medians over `--steps` after `--warmup`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ranke.backbones.base import build_text_encoder
from ranke.backbones.toy import load_tokenizer
from ranke.config import RunConfig
from ranke.models.gpt import Transformer, key_padding, padded_causal_mask
from ranke.models.vq import to_model_range
from ranke.toy.data import train_batch
from ranke.precision import machine_description

KERNELS = {"fused": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def attention_ms(batch: int, kernel: SDPBackend, dtype: torch.dtype, repeats: int) -> float:
    """Median milliseconds of one attention forward + backward at the toy policy's shape."""
    heads, positions, head_dim, text_positions = 6, 68, 32, 4
    q, k, v = (torch.randn(batch, heads, positions, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
    text_mask = torch.ones(batch, text_positions, dtype=torch.bool)
    text_mask[: batch // 2, :2] = False  # half the captions are padded, as in a toy batch
    mask = padded_causal_mask(key_padding(text_mask, positions))
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        with sdpa_kernel(kernel):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.float().sum().backward()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def sft_step_split(batch: int, steps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per part of a bf16 toy SFT step."""
    cfg = RunConfig()
    tokenizer = load_tokenizer(None, "cpu").requires_grad_(False)
    text_encoder = build_text_encoder(cfg.text, "cpu")
    policy = Transformer(cfg.gpt)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    parts = {name: [] for name in ("data", "encode", "text", "forward", "backward", "optimizer", "step")}
    for _ in range(warmup + steps):
        marks = [time.perf_counter()]
        images, captions, _ = train_batch(rng, batch, cfg.toy)
        marks.append(time.perf_counter())
        with torch.no_grad():
            codes = tokenizer.encode_codes(to_model_range(images)).flatten(1)
        marks.append(time.perf_counter())
        text_emb, text_mask = text_encoder.encode(captions)
        marks.append(time.perf_counter())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = policy(text_emb, codes, text_mask, caption_dropout=True, dropout=True)
        loss = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
        marks.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        opt.step()
        marks.append(time.perf_counter())
        for name, begin, end in zip(parts, marks, marks[1:]):
            parts[name].append(end - begin)
        parts["step"].append(marks[-1] - marks[0])
    return {name: 1000 * statistics.median(values[warmup:]) for name, values in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine_description()}")

    print(f"\nattention forward + backward, batch {args.batch_size}, 6 heads, 68 positions, head size 32 (ms)")
    print("| dtype | fused | math |")
    print("|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        cells = [f"{attention_ms(args.batch_size, kernel, dtype, args.steps):.1f}" for kernel in KERNELS.values()]
        print(f"| {str(dtype).removeprefix('torch.')} | " + " | ".join(cells) + " |")

    split = sft_step_split(args.batch_size, args.steps, args.warmup)
    print(f"\ntoy SFT step in bf16, batch {args.batch_size}: median ms over {args.steps} steps "
          f"(load average {os.getloadavg()[0]:.1f})")
    print("| " + " | ".join(split) + " |")
    print("|---" * len(split) + "|")
    print("| " + " | ".join(f"{value:.1f}" for value in split.values()) + " |")


if __name__ == "__main__":
    main()
