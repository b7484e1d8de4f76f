"""The GPU benchmark script still runs (its CPU smoke mode, toy sizes), so it is ready when a GPU is lent."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_gpu_rollout_benchmark_smoke():
    script = Path(__file__).parent.parent / "benchmarks" / "gpu_rollout.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANKE_NO_PROGRESS": "1"}
    result = subprocess.run([sys.executable, str(script), "--smoke"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| 4 |" in result.stdout and "decoder stage" in result.stdout and "step" in result.stdout


def test_memory_estimate_matches_hand_counts():
    """The memory table's parameter count and KV cache agree with sizes worked out by hand."""
    script = Path(__file__).parent.parent / "benchmarks" / "memory_estimate.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), "--model", "llamagen-xl", "--markdown"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for line in result.stdout.splitlines():
        cells = [cell.strip(" *") for cell in line.strip("|").split("|")]
        if len(cells) == 4 and cells[1].replace(".", "").isdigit():
            rows[cells[0]] = (float(cells[1]), float(cells[2]), float(cells[3]))

    def row(start: str) -> tuple[float, float, float]:
        return next(value for label, value in rows.items() if label.startswith(start))

    # GPT-XL: caption MLP (2048 -> 1280 -> 1280), token embeddings and output head (16384 x 1280),
    # final norm, 36 blocks of fused qkv, output projection, SwiGLU (hidden 3584) and two norms.
    dim, hidden, vocab = 1280, 3584, 16384
    block = dim * 3 * dim + dim * dim + 3 * dim * hidden + 2 * dim
    params = 2048 * dim + dim * dim + 2 * vocab * dim + dim + 36 * block
    assert f"policy parameters as instantiated: {params:,}" in result.stdout
    gib = 2**30
    # LoRA column: rank 16 on wqkv (1280 -> 3840), wo (1280 -> 1280), w1 and w3 (1280 -> 3584), w2 (3584 -> 1280)
    adapter = 36 * 16 * ((dim + 3 * dim) + (dim + dim) + 3 * (dim + hidden))
    assert f"{adapter:,} trainable parameters" in result.stdout
    assert row("policy weights, fp32 master") == (
        round(params * 4 / gib, 2), round(params * 4 / 8 / gib, 2), round((params + adapter) * 4 / gib, 2)
    )
    assert row("policy AdamW states")[2] == round(2 * adapter * 4 / gib, 2)
    assert row("frozen reference policy")[2] == 0
    # keys and values x 36 layers x (32 conditional + 32 unconditional rows) x 20 heads x
    # (120 text + 256 image positions) x head size 64 x 2 bytes (bf16)
    kv_cache = 2 * 36 * 64 * 20 * (120 + 256) * 64 * 2
    assert row("rollout: KV cache, bf16, 64 rows x 376 positions") == (round(kv_cache / gib, 2),) * 3
    plain = rows["policy pass: activations, micro-batch 32"][0]
    checkpointed = rows["policy pass: activations, micro-batch 32, checkpointed"][0]
    assert 25 < plain and checkpointed < plain / 4  # about 1 GiB of saved tensors per rollout
    # GPU attention kernels keep no attention matrix: one bf16 copy of 36 layers x 32 rows x 20
    # heads x 376^2 positions would add 6.1 GiB (the CPU math path kept two: 39.1 GiB)
    assert plain < 31
    # the peak is what is held plus the largest phase, here the policy's forward/backward
    peak = row("peak, no checkpointing")
    for column in (0, 2):  # DDP, and LoRA: the same phase on top of less held memory
        assert abs(peak[column] - (row("held throughout")[column] + row("policy pass: autocast")[column] + plain)) <= 0.02


def test_sft_step_benchmark_prints_both_tables():
    script = Path(__file__).parent.parent / "benchmarks" / "sft_step.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), "--threads", "1", "--batch-size", "4", "--steps", "1", "--warmup", "0"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == "| dtype | fused | math |" and rows[1].startswith("| float32 |") and rows[2].startswith("| bfloat16 |")
    header, values = rows[3].strip("| ").split(" | "), rows[4].strip("| ").split(" | ")
    assert header == ["data", "encode", "text", "forward", "backward", "optimizer", "step"]
    assert float(values[-1]) >= max(float(value) for value in values[:-1]) > 0  # the step holds every part


def test_precision_benchmark_names_the_machine_and_the_choice():
    script = Path(__file__).parent.parent / "benchmarks" / "precision.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), "--widths", "32"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CPU capability " in result.stdout and "bf16 matmul native: " in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 32 |"))
    assert row.split("|")[4].strip() in ("fp32", "bf16")


def test_decoder_sensitivity_replaces_the_drawn_fraction_by_the_chosen_substitutes():
    """benchmarks/decoder_sensitivity.py's corruption: by hand on a 1-d codebook 0, 1, 3 (nearest
    of 0 is 1, of 1 is 0, of 3 is 1), and the replaced fraction of 20,000 positions near p."""
    import importlib.util

    import torch

    path = Path(__file__).parent.parent / "benchmarks" / "decoder_sensitivity.py"
    spec = importlib.util.spec_from_file_location("decoder_sensitivity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    codebook = torch.tensor([[0.0], [1.0], [3.0]])
    codes = torch.tensor([[0, 1, 2, 2]])
    generator = torch.Generator().manual_seed(0)
    assert module.substitutes(codebook, "nearest", codes, generator).tolist() == [[1, 0, 1, 1]]
    uniform = module.substitutes(codebook, "uniform", torch.zeros(1, 20_000, dtype=torch.long), generator)
    assert set(uniform.unique().tolist()) == {0, 1, 2}
    codes = torch.zeros(1, 20_000, dtype=torch.long)
    replacement = torch.ones_like(codes)
    assert torch.equal(module.corrupted(codes, 0.0, replacement, generator), codes)
    assert torch.equal(module.corrupted(codes, 1.0, replacement, generator), replacement)
    assert abs(module.corrupted(codes, 0.1, replacement, generator).float().mean().item() - 0.1) < 0.01
    assert module.fraction_list("0,0.05,1") == [0.0, 0.05, 1.0]
    for bad in ("0,x", "0,1.5", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError):
            module.fraction_list(bad)
