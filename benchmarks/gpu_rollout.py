"""GPU benchmark of the post-training hot path at LlamaGen-XL scale (runs in <= 5 minutes on one GPU).

    python benchmarks/gpu_rollout.py                 # GPT-XL-sized random policy + VQ-16, 256 px, bf16 autocast
    python benchmarks/gpu_rollout.py --smoke         # toy sizes on CPU: checks the script itself (a test runs it)

Prints: rollout images/s with CFG at batch 16 / 64 / 128 and the achieved TFLOP/s of the sampler
against the device's measured bf16 matmul peak; one full RankE step (rollout, reference
log-probs, decode, reward, policy stage, decoder stage) split by phase; peak GPU memory. Weights
are random (speed does not depend on them); captions are random embeddings of the T5 shape; the
reward is the committed toy CLIP, which resizes any image to its 64 px input (a stand-in: CLIP
ViT-L/14 costs more, and its cost does not depend on RankE).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from sampling import generate_flops  # benchmarks/sampling.py

from ranke.backbones import Backbone
from ranke.config import PosttrainConfig, RunConfig, SamplingConfig
from ranke.models.discriminator import PatchDiscriminator
from ranke.models.gpt import GPT_PRESETS, Transformer
from ranke.models.perceptual import build_perceptual
from ranke.models.vq import VQ_PRESETS, VQModel
from ranke.parallel import Shard
from ranke.precision import choose_precision, machine_description
from ranke.rewards.build import build_reward
from ranke.runtime import autocast
from ranke.train import state as state_lib
from ranke.train.posttrain import PosttrainRun, collect_rollout, decoder_stage, policy_stage
from ranke.train.posttrain_models import Models, build_optimizers


class RandomCaptions:
    """Caption embeddings of the text encoder's shape (the benchmark times everything after T5)."""

    def __init__(self, tokens: int, dim: int):
        self.tokens, self.dim = tokens, dim

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(len(prompts))
        return torch.randn(len(prompts), self.tokens, self.dim, generator=generator), torch.ones(len(prompts), self.tokens, dtype=torch.bool)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU (fp32), to check the script")
    parser.add_argument("--batches", type=int, nargs="*", default=None)
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    gpt_args = GPT_PRESETS["toy" if args.smoke else "GPT-XL"]
    precision = choose_precision("fp32" if args.smoke else "auto", device, gpt_args.dim)
    dtype = torch.float32 if precision.name == "fp32" else torch.bfloat16
    vq_args = VQ_PRESETS["toy" if args.smoke else "VQ-16"]
    gpt_args = dataclasses.replace(gpt_args, vocab_size=vq_args.codebook_size)
    batches = args.batches or ([2, 4] if args.smoke else [16, 64, 128])
    image_size = gpt_args.grid_size * vq_args.downsample_factor
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{dtype} ({precision.reason}), policy {'toy' if args.smoke else 'GPT-XL'}, {image_size} px, "
          f"{gpt_args.block_size} tokens")  # fmt: skip
    print(f"machine: {machine_description()}")
    peak = matmul_peak_tflops(device, dtype, size=1024 if args.smoke else 8192)
    print(f"measured matmul peak: {peak:.1f} TFLOP/s ({dtype})")

    torch.manual_seed(0)
    policy = Transformer(gpt_args).to(device)
    vq = VQModel(vq_args).to(device).eval().requires_grad_(False)
    backbone = Backbone(RandomCaptions(gpt_args.cls_token_num, gpt_args.caption_dim), policy, vq)
    sampling = SamplingConfig(cfg_scale=6.0, top_k=1000)

    print("\n| batch | seconds | images/s | TFLOP/s | % of peak |\n|---|---|---|---|---|")
    for batch in batches:
        emb, mask = backbone.encode_prompts(["p"] * batch)
        with autocast(device, precision.name):
            backbone.sample(emb, mask, sampling, torch.Generator(device).manual_seed(0))  # warm-up
            synchronize(device)
            start = time.perf_counter()
            backbone.sample(emb, mask, sampling, torch.Generator(device).manual_seed(1))
            synchronize(device)
        seconds = time.perf_counter() - start
        tflops = generate_flops(gpt_args, 2 * batch) / seconds / 1e12
        print(f"| {batch} | {seconds:.2f} | {batch / seconds:.1f} | {tflops:.2f} | {100 * tflops / peak:.0f}% |")

    pcfg = PosttrainConfig(prompts_per_step=2 if args.smoke else 4, group_size=8, disc_start=0, mode="both")
    vq.requires_grad_(False)
    for parameter in vq.decoder_parameters():
        parameter.requires_grad_(True)
    models = Models(
        policy=policy, policy_ema=state_lib.EMA(policy, 0.999),
        reference=Transformer(gpt_args).to(device).eval().requires_grad_(False), vq=vq, vq_ema=state_lib.EMA(vq, 0.99),
        disc=PatchDiscriminator().to(device), perceptual=build_perceptual("pyramid").to(device),
    )  # fmt: skip
    # AdamW at the released learning rates; 0: the guards never stop the run
    optimizers = build_optimizers(models, pcfg, 0, device)
    reward = build_reward({"toy_clip": 1.0}, device)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu")
    prompts = [f"prompt {i}" for i in range(pcfg.prompts_per_step)]
    real = torch.rand(pcfg.prompts_per_step, 3, image_size, image_size, device=device)
    shard = Shard(0, pcfg.prompts_per_step, pcfg.prompts_per_step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = RunConfig(posttrain=pcfg, sampling=sampling)
    run = PosttrainRun(
        cfg=cfg, run_dir=None, backbone=backbone, models=models, optimizers=optimizers, policy_for_loss=policy,
        reward=reward, prompt_source=None, generators={}, accelerator=accelerator, shard=shard, precision=precision,
        sharding="ddp",
    )  # fmt: skip
    for step in range(2):  # the second step is timed
        timings: dict[str, float] = {}
        synchronize(device)
        start = time.perf_counter()
        run.generators["rollout"] = torch.Generator(device).manual_seed(step)
        rollout = collect_rollout(run, prompts, timings)
        for phase, stage in (
            ("policy stage", lambda: policy_stage(run, rollout, step)),
            ("decoder stage", lambda: decoder_stage(run, rollout, real, step)),
        ):
            synchronize(device)
            phase_start = time.perf_counter()
            stage()
            synchronize(device)
            timings[phase] = time.perf_counter() - phase_start
        synchronize(device)
        timings["step"] = time.perf_counter() - start
    rows = pcfg.prompts_per_step * pcfg.group_size
    print(f"\nRankE step, {pcfg.prompts_per_step} prompts x {pcfg.group_size} rollouts ({rows} sequences):")
    print(" | ".join(f"{name} {seconds:.2f} s" for name, seconds in timings.items()))
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
