"""Per-GPU memory of a RankE post-training step (mode=both) for LlamaGen-XL and Janus-Pro-1B / 7B,
at the reference setting: 8 GPUs, 32 prompts x 8 rollouts per step, i.e. 4 prompts x 8 = 32
rollouts per GPU, bf16 autocast with fp32 master weights. docs/memory.md shows the tables.

    python benchmarks/memory_estimate.py                        # every model
    python benchmarks/memory_estimate.py --markdown             # the tables of docs/memory.md
    python benchmarks/memory_estimate.py --model janus-pro-1b --micro-batch 8 --reward hpsv2
    python benchmarks/memory_estimate.py --precision fp32      # instead of the presets' bf16

How the figures are made (nothing is downloaded or allocated; about 10 s on a CPU):
* every model is our own class or transformers' class, built under FakeTensorMode (tensors
  with shapes and dtypes but no storage) from its preset or its published configuration
  (the size tables below); parameter and buffer bytes are counted from those modules;
* activations are measured: the policy stage's teacher-forced forward and GRPO loss
  (`ranke.sampling.token_logprobs`, `grpo_policy_loss`) and the decoder step's forward
  (`ranke.train.posttrain.decoder_loss`) run on fake tensors under CPU bf16 autocast (the
  presets' precision; `--precision fp32` runs without it), and
  `torch.autograd.graph.saved_tensors_hooks` adds up the storages kept for backward, each
  storage once, parameters and buffers excluded. Attention runs the fused kernel (PyTorch's CPU
  flash attention, which keeps q, k, v, the output and the row log-sum-exp, as CUDA's fused
  kernels do); LlamaGen's RMSNorm keeps what CUDA's fused kernel keeps (`CudaRMSNorm`);
* with gradient checkpointing (the models' own switches) the forward keeps what lies outside
  the checkpointed blocks plus each block's input (measured), and backward recomputes one block
  at a time (the largest block's saved tensors, measured without checkpointing);
* the rollout KV cache, DDP buckets, FSDP gather buffers and AdamW temporaries are formulas;
* the LoRA column (`posttrain.lora`, DDP): the policy's weights frozen (no gradients, no AdamW
  states, no EMA copy, no reference copy: the reference is the base with the adapter off), the
  adapter's weights, gradients, AdamW states and EMA (rank x (in + out) per targeted linear layer,
  counted from the models' layers), activations and every other row as in the DDP column.
Peak = what is held all along + the largest phase (rollout, policy forward/backward, policy
optimizer step, decoder stage, checkpoint save). Not counted: CUDA context, allocator
fragmentation, NCCL buffers, short-lived temporaries (largest: one fp32 logits tensor, printed
below the table).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from functools import partial
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import (
    CLIPConfig,
    CLIPModel,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusVisionConfig,
    JanusVQVAE,
    JanusVQVAEConfig,
    LlamaConfig,
    T5Config,
    T5EncoderModel,
)

import ranke.models.gpt as gpt_module
import ranke.models.perceptual as perceptual_module
from ranke import config as config_lib
from ranke.algo.grpo import grpo_policy_loss
from ranke.config import RunConfig
from ranke.models.discriminator import PatchDiscriminator
from ranke.models.gpt import GPT_PRESETS, Transformer
from ranke.models.janus import JanusDecoder, JanusPolicy
from ranke.models.lora import GPT_TARGET_MODULES, LoraArgs
from ranke.models.vq import VQ_PRESETS, VQModel, to_model_range
from ranke.rewards.base import DualEncoderReward
from ranke.rewards.clip import CLIPReward
from ranke.rewards.combine import CombinedReward
from ranke.sampling import token_logprobs
from ranke.train.posttrain import RankSelection, decoder_loss

GIB = 2**30
BF16_BYTES = 2
FP32_BYTES = 4

# --- published sizes (config.json of each checkpoint), written here as data -------------------

# google/flan-t5-xl config.json: the encoder LlamaGen uses for its 120 caption positions.
FLAN_T5_XL = dict(
    d_model=2048, d_ff=5120, num_layers=24, num_heads=32, d_kv=64, vocab_size=32128,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
)
# openai/clip-vit-large-patch14 config.json: the CLIP reward of the reference runs.
CLIP_VIT_L14 = dict(
    projection_dim=768,
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     vocab_size=49408, max_position_embeddings=77),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14),
)  # fmt: skip
# HPSv2.1 is OpenCLIP ViT-H-14 (open_clip's ViT-H-14.json: embed_dim 1024; vision width 1280, 32
# layers, head width 80, mlp ratio 4, patch 14, 224 px; text width 1024, 16 heads, 24 layers, 77
# tokens). Written in transformers' CLIP layout, which has the same parameters up to a few biases.
HPSV2_VIT_H14 = dict(
    projection_dim=1024,
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     vocab_size=49408, max_position_embeddings=77),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14),
)  # fmt: skip
# deepseek-ai/Janus-Pro-1B config.json, language_config (a DeepSeek-LLM-1.5B-style Llama). Its
# vision tower (SigLIP-L, 384 px, patch 16), VQ-16 (16384 codes of dim 8, 24x24 tokens) and
# generation head/aligner (2048 wide) are the defaults of transformers' JanusVisionConfig and
# JanusVQVAEConfig; the vision tower is dropped by `load_janus_backbone` and not counted.
JANUS_PRO_1B_LM = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
    vocab_size=102400, max_position_embeddings=16384, rms_norm_eps=1e-6,
)  # fmt: skip
# deepseek-ai/Janus-Pro-7B config.json: language_config (DeepSeek-LLM-7B: 30 x 4096, 32 heads) and
# a 4096-wide generation aligner and head (gen_aligner n_embed, gen_head image_token_embed); the
# same SigLIP-L tower (dropped) and VQ-16 as the 1B.
JANUS_PRO_7B_LM = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=102400, max_position_embeddings=16384, rms_norm_eps=1e-6,
)  # fmt: skip
JANUS_PRO_7B_GENERATION = dict(projection_dim=4096, image_token_embed_dim=4096)
# Janus prompts are a chat template around the caption; 64 tokens covers captions of ~45 words.
JANUS_PROMPT_TOKENS = 64
REWARD_SIZES = {"clip": ("CLIP ViT-L/14", CLIP_VIT_L14), "hpsv2": ("HPSv2.1 ViT-H/14", HPSV2_VIT_H14)}
# bundled config presets (ranke/configs/) of the reference runs
PRESETS = {"llamagen-xl": "llamagen_xl_clip", "janus-pro-1b": "janus_pro_1b_clip", "janus-pro-7b": "janus_pro_7b_clip"}
# the LoRA column's adapter: the defaults of `posttrain.lora`, on each model's attention and MLP projections
LORA = LoraArgs(enabled=True)
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Setting:
    """The run the estimate is for (defaults: the reference runs of METHOD.md section 5)."""

    gpus: int = 8
    prompts_per_gpu: int = 4
    group_size: int = 8
    micro_batch: int = 0  # policy-stage rollouts per forward/backward; 0: all of them
    reward: str = "clip"
    precision: str | None = None  # bf16 (autocast, fp32 master weights) | fp32; None: the preset's

    @property
    def rollouts(self) -> int:
        return self.prompts_per_gpu * self.group_size

    @property
    def micro(self) -> int:
        return min(self.micro_batch or self.rollouts, self.rollouts)

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of the KV cache and of weights gathered for compute."""
        return BF16_BYTES if self.precision == "bf16" else FP32_BYTES

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")


# --- the models of one run ---------------------------------------------------------------------


@dataclass
class RunModels:
    """Everything a GPU holds in post-training, with what the estimate needs to know about it."""

    title: str
    policy: torch.nn.Module
    policy_blocks: torch.nn.ModuleList  # what policy gradient checkpointing and FSDP split into units
    vq: torch.nn.Module  # VQModel or JanusDecoder: encode_codes, decode_codes, decoder_parameters
    vq_ema: torch.nn.Module
    decoder_blocks: list[torch.nn.Module]  # the units decoder gradient checkpointing recomputes
    text_encoder: torch.nn.Module | None  # None: the prompt goes through the policy itself (Janus)
    text_encoder_name: str
    disc: torch.nn.Module
    perceptual: torch.nn.Module
    reward: DualEncoderReward
    reward_name: str
    image_size: int
    image_tokens: int
    text_positions: int  # caption positions (LlamaGen) or prompt tokens (Janus) before the image
    kv_layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    policy_inputs: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # rows -> (text input, mask)
    lora_targets: tuple[str, ...]  # the linear layers a LoRA adapter goes on (`posttrain.lora.target_modules`)
    extra_notes: list[str] = field(default_factory=list)


class ConfiguredCLIP(CLIPReward):
    """CLIPReward's image path (preprocessing, `get_image_features`) on a model built from a config
    instead of a local directory. Text features come from a no-grad cache and the pixel statistics
    change no shape, so placeholders do for both."""

    def __init__(self, model: CLIPModel, name: str):
        self.model = model.eval().requires_grad_(False)
        vision = model.config.vision_config
        DualEncoderReward.__init__(self, name, vision.image_size, (0.5,) * 3, (0.25,) * 3, "cpu", scale=100.0)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return torch.randn(len(prompts), self.model.config.projection_dim)


def build_reward(kind: str) -> tuple[DualEncoderReward, str]:
    name, sizes = REWARD_SIZES[kind]
    config = CLIPConfig(
        text_config=sizes["text_config"], vision_config=sizes["vision_config"], projection_dim=sizes["projection_dim"],
        attn_implementation="sdpa",
    )  # fmt: skip
    return ConfiguredCLIP(CLIPModel(config), kind), name


def build_lpips() -> torch.nn.Module:
    """LPIPS-VGG16 with its real layout and forward; zeros stand in for the weight files it reads."""

    def zeros_of_layout(path, expected, what, ignore=()):
        return {key: torch.zeros(shape) for key, shape in expected.items()}

    with mock.patch.object(perceptual_module, "_read_exact", zeros_of_layout):
        return perceptual_module.LPIPS("vgg16.pth", "vgg.pth")


def build_llamagen(pcfg, reward_kind: str) -> RunModels:
    gpt, vq_args = GPT_PRESETS["GPT-XL"], VQ_PRESETS["VQ-16"]
    policy, vq, vq_ema = Transformer(gpt), VQModel(vq_args), VQModel(vq_args).requires_grad_(False)
    vq.freeze_token_space()  # as `build_models`: only the decoder and post_quant_conv train
    text = T5EncoderModel(T5Config(**FLAN_T5_XL))
    reward, reward_name = build_reward(reward_kind)

    def policy_inputs(rows: int):
        mask = torch.ones(rows, gpt.cls_token_num, dtype=torch.bool)
        return torch.randn(rows, gpt.cls_token_num, gpt.caption_dim), mask

    return RunModels(
        title="LlamaGen-XL (GPT-XL + VQ-16, 256 px)",
        policy=policy, policy_blocks=policy.transformer_blocks(),
        vq=vq, vq_ema=vq_ema, decoder_blocks=[*vq.decoder.mid, *vq.decoder.conv_blocks],
        text_encoder=text.eval().requires_grad_(False), text_encoder_name="flan-t5-xl encoder",
        disc=PatchDiscriminator(base_channels=pcfg.disc_channels, n_layers=pcfg.disc_layers),
        perceptual=build_lpips(), reward=reward, reward_name=reward_name,
        image_size=gpt.grid_size * vq_args.downsample_factor, image_tokens=gpt.block_size,
        text_positions=gpt.cls_token_num, kv_layers=gpt.n_layer, kv_heads=gpt.kv_heads, head_dim=gpt.head_dim,
        vocab=gpt.vocab_size, policy_inputs=policy_inputs, lora_targets=GPT_TARGET_MODULES,
    )  # fmt: skip


def build_janus(
    pcfg, reward_kind: str, size: str = "1B", lm: dict = JANUS_PRO_1B_LM, generation: dict | None = None
) -> RunModels:
    config = JanusConfig(
        text_config=LlamaConfig(**lm), vision_config=JanusVisionConfig(), vq_config=JanusVQVAEConfig(**(generation or {})),
        attn_implementation="sdpa",
    )  # fmt: skip
    # the parts `load_janus_backbone` keeps: policy modules and the VQ model (vision tower, lm_head dropped)
    janus = JanusForConditionalGeneration(config)
    policy = JanusPolicy(janus)
    vq = JanusDecoder(janus.model.vqmodel)
    vq_ema = JanusDecoder(JanusVQVAE(config.vq_config)).requires_grad_(False)
    reward, reward_name = build_reward(reward_kind)
    lm = config.text_config
    grid = config.vq_config.num_patches

    def policy_inputs(rows: int):
        ids = torch.randint(lm.vocab_size, (rows, JANUS_PROMPT_TOKENS))
        return ids, torch.ones(rows, JANUS_PROMPT_TOKENS, dtype=torch.long)

    return RunModels(
        title=f"Janus-Pro-{size} (Llama LM {lm.num_hidden_layers} x {lm.hidden_size} + VQ-16, {vq.args.image_size} px)",
        policy=policy, policy_blocks=policy.transformer_blocks(),
        vq=vq, vq_ema=vq_ema, decoder_blocks=[vq.vq.decoder],
        text_encoder=None, text_encoder_name="none (the prompt goes through the policy's LM)",
        disc=PatchDiscriminator(base_channels=pcfg.disc_channels, n_layers=pcfg.disc_layers),
        perceptual=build_lpips(), reward=reward, reward_name=reward_name,
        image_size=vq.args.image_size, image_tokens=grid * grid, text_positions=JANUS_PROMPT_TOKENS,
        kv_layers=lm.num_hidden_layers, kv_heads=lm.num_key_value_heads, head_dim=lm.head_dim,
        vocab=config.vq_config.num_embeddings, policy_inputs=policy_inputs, lora_targets=LLAMA_TARGET_MODULES,
        extra_notes=[f"Janus prompt length assumed {JANUS_PROMPT_TOKENS} tokens (chat template + caption)"],
    )  # fmt: skip


BUILDERS = {
    "llamagen-xl": build_llamagen,
    "janus-pro-1b": build_janus,
    "janus-pro-7b": partial(build_janus, size="7B", lm=JANUS_PRO_7B_LM, generation=JANUS_PRO_7B_GENERATION),
}


# --- counting ----------------------------------------------------------------------------------


def parameter_count(params) -> int:
    return sum(p.numel() for p in params)


def millions(params) -> str:
    return f"{parameter_count(params) / 1e6:.1f}M"


def lora_parameter_count(policy: torch.nn.Module, targets: tuple[str, ...], rank: int) -> int:
    """The parameters of a rank-`rank` adapter on the policy's linear layers named `targets` (the
    last part of the name, as PEFT matches them): A is rank x in, B is out x rank."""
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in policy.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )


def state_bytes(module: torch.nn.Module | None) -> int:
    """Parameters and buffers as held (fp32 here: the recipes keep every model in float32)."""
    if module is None:
        return 0
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def kv_cache_bytes(layers: int, rows: int, kv_heads: int, seq_len: int, head_dim: int, dtype_bytes: int) -> int:
    """Keys and values of every layer for `rows` sequences of `seq_len` positions."""
    return 2 * layers * rows * kv_heads * seq_len * head_dim * dtype_bytes


# Autograd nodes of views: a saved `weight.t()` is still the weight copy's storage.
VIEW_NODES = ("TBackward0", "ViewBackward0", "TransposeBackward0", "PermuteBackward0", "ExpandBackward0")


def is_weight_copy(tensor: torch.Tensor) -> bool:
    """A bf16 copy of a trainable weight made (and cached until backward) by autocast, or a view of one."""
    node = tensor.grad_fn
    while node is not None and node.name() in VIEW_NODES:
        node = node.next_functions[0][0]
    return (
        node is not None
        and node.name() == "ToCopyBackward0"
        and any(type(fn).__name__ == "AccumulateGrad" for fn, _ in node.next_functions if fn is not None)
    )


class SavedTensorMeter:
    """Adds up the storages autograd keeps for backward while a forward runs, each storage once.

    Storages of parameters and buffers are skipped (they are counted as model state). Storages
    packed while one of `blocks` runs are attributed to that call (its index); the call's input is
    recorded first as "block input", since with checkpointing it is kept anyway (non-reentrant
    checkpointing saves it) and recomputing the block does not copy it again."""

    def __init__(self, modules: list[torch.nn.Module], blocks: list[torch.nn.Module]):
        # storages are told apart by their C++ object (`_cdata`): fake tensors have no data pointer
        self.state_storages = {t.untyped_storage()._cdata for m in modules for t in [*m.parameters(), *m.buffers()]}
        self.saved: dict[int, tuple[str | int, int]] = {}  # storage -> (where or block call, bytes)
        self.block_call: int | None = None
        self.calls = 0
        self.blocks = blocks
        self.handles = []
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _record(self, tensor: torch.Tensor, where: str | int) -> None:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.state_storages and storage._cdata not in self.saved:
            self.saved[storage._cdata] = (where, storage.nbytes())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if is_weight_copy(tensor):
            self._record(tensor, "weight copy")
        else:
            self._record(tensor, "outside" if self.block_call is None else self.block_call)
        return tensor

    def _enter_block(self, module, args, kwargs):
        inputs = [*args, kwargs.get("hidden_states")]
        for value in inputs:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                self._record(value, "block input")
                break
        self.block_call, self.calls = self.calls, self.calls + 1

    def _leave_block(self, module, args, output):
        self.block_call = None

    def __enter__(self):
        for block in self.blocks:
            self.handles.append(block.register_forward_pre_hook(self._enter_block, with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._leave_block))
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        for handle in self.handles:
            handle.remove()

    def weight_copies(self) -> int:
        return sum(size for where, size in self.saved.values() if where == "weight copy")

    def largest_block(self) -> int:
        per_call: dict[int, int] = {}
        for where, size in self.saved.values():
            if isinstance(where, int):
                per_call[where] = per_call.get(where, 0) + size
        return max(per_call.values(), default=0)

    def activations(self) -> int:
        """Everything kept for backward except autocast's weight copies."""
        return sum(size for where, size in self.saved.values() if where != "weight copy")


@dataclass
class Activations:
    plain: int  # saved for backward, no checkpointing
    checkpointed: int  # outside blocks + block inputs + one block recomputed
    weight_copies: int = 0  # autocast's bf16 copies of trainable weights, held from forward to backward


def measure_with_checkpointing(run_forward, modules, blocks, enable_checkpointing) -> Activations:
    """`run_forward()` measured twice: as is, then with the model's checkpointing switch on."""
    with SavedTensorMeter(modules, blocks) as plain:
        run_forward()
    enable_checkpointing()
    # No block attribution here: what the checkpointed blocks save goes to checkpointing's own
    # hooks, and a recompute inside the forward (the adaptive GAN weight's gradient) may stop
    # early without leaving its block.
    with SavedTensorMeter(modules, []) as recomputed:
        run_forward()
    checkpointed = recomputed.activations() + plain.largest_block()
    return Activations(plain.activations(), checkpointed, plain.weight_copies())


class CudaRMSNorm(torch.autograd.Function):
    """RMSNorm keeping for backward what CUDA's fused kernel keeps (`_fused_rms_norm`: the input
    and the inverse RMS). On CPU, PyTorch decomposes `F.rms_norm` and also keeps the normalised
    fp32 output, one more [rows, positions, dim] tensor per norm. Forward only: never backpropagated."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        inverse_rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, inverse_rms, weight)
        return x.float() * inverse_rms * weight


def cuda_rms_norm(norm: gpt_module.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return CudaRMSNorm.apply(x, norm.weight, norm.eps)


def fused_attention_kernel(*backends) -> contextlib.AbstractContextManager:
    """Stands in for `sdpa_kernel` in `ranke.models.gpt`: a bf16 whole-sequence pass on a CPU asks
    for the math path there (faster on CPU), which keeps the attention matrix for backward; on a
    GPU SDPA runs a fused kernel, which keeps what PyTorch's CPU flash kernel keeps, so the
    measurement leaves the choice to SDPA."""
    return contextlib.nullcontext()


def policy_activations(models: RunModels, rows: int, setting: Setting) -> Activations:
    """The policy stage's forward for one micro-batch: teacher-forced log-probs and entropies
    (`token_logprobs`, as `policy_stage` calls it) and the GRPO loss, under the run's precision,
    with LlamaGen's RMSNorm and attention saving what they save on a GPU."""
    text, mask = models.policy_inputs(rows)
    tokens = torch.randint(models.vocab, (rows, models.image_tokens))
    old, ref = torch.randn(rows, models.image_tokens), torch.randn(rows, models.image_tokens)
    advantages = torch.randn(rows)

    def run_forward():
        with (
            setting.autocast(),
            mock.patch.object(gpt_module.RMSNorm, "forward", cuda_rms_norm),
            mock.patch.object(gpt_module, "sdpa_kernel", fused_attention_kernel),
        ):
            logp_new, entropy = token_logprobs(models.policy, text, mask, tokens, return_entropy=True)
        return grpo_policy_loss(logp_new, old, ref, advantages), entropy

    return measure_with_checkpointing(
        run_forward, [models.policy], list(models.policy_blocks), models.policy.enable_gradient_checkpointing
    )


def decoder_stage_activations(models: RunModels, pcfg, prompts: int, setting: Setting) -> Activations:
    """The decoder step's forward (`decoder_stage`: one decode of the real codes, then
    `decoder_loss`) on `prompts` real images and `rank_top_k` selected rollouts per prompt (1 in
    the presets, which also leave the soft-token term off), discriminator on, under the run's
    precision. The discriminator step before it keeps its graph only until its own backward and
    holds less."""
    selected = prompts * pcfg.rank_top_k
    real = torch.rand(prompts, 3, models.image_size, models.image_size)
    tokens = torch.randint(models.vocab, (selected, models.image_tokens))
    weights = torch.ones(selected)
    reward = CombinedReward([(models.reward, 1.0)])
    holder = SimpleNamespace(vq=models.vq, vq_ema=SimpleNamespace(module=models.vq_ema), disc=models.disc,
                             perceptual=models.perceptual, policy=models.policy)  # fmt: skip
    # no backbone, rollout or selection indices: they serve only the soft-token term (off)
    run = SimpleNamespace(pcfg=pcfg, models=holder, reward=reward, backbone=None)
    selection = RankSelection(None, weights, None, 1.0, tokens, ["a prompt"] * selected)
    models.disc.requires_grad_(False)  # as during the decoder step
    step = max(pcfg.disc_start, pcfg.consistency_span[1]) + 1

    def run_forward():
        with setting.autocast():
            target = to_model_range(real)
            with torch.no_grad():
                real_codes = models.vq.encode_codes(target)
            recon = models.vq.decode_codes(real_codes)
            return decoder_loss(run, None, selection, target, recon, step, 1.0)

    modules = [models.vq, models.vq_ema, models.disc, models.perceptual, models.reward.model]
    return measure_with_checkpointing(
        run_forward, modules, models.decoder_blocks, models.vq.enable_gradient_checkpointing
    )


# --- the table ---------------------------------------------------------------------------------

PLAIN_PHASES = ("rollout", "policy pass", "policy step", "decoder stage", "checkpoint save")
CHECKPOINTED_PHASES = ("rollout", "policy pass, checkpointed", "policy step", "decoder stage, checkpointed",
                       "checkpoint save")  # fmt: skip


COLUMNS = ("ddp", "fsdp", "lora")


@dataclass
class Row:
    label: str
    ddp: float  # bytes per GPU with the policy replicated (DDP)
    fsdp: float  # bytes per GPU with the policy sharded over the GPUs (FSDP)
    phases: tuple[str, ...] = ()  # the phases it is alive in; () for what is held all along
    total: bool = False
    lora: float | None = None  # bytes per GPU with a LoRA adapter (DDP); None: as in the DDP column

    def bytes(self, column: str) -> float:
        return self.ddp if column == "lora" and self.lora is None else getattr(self, column)


@dataclass
class Estimate:
    title: str
    rows: list[Row]
    notes: list[str]
    seconds: float


def held_rows(models: RunModels, policy_params: int, shard: float, adapter_params: int) -> list[Row]:
    """What every GPU holds for the whole run: models, gradients, optimizer states."""
    policy, adapter = policy_params * FP32_BYTES, adapter_params * FP32_BYTES
    decoder_params = parameter_count(models.vq.decoder_parameters())
    disc_params = parameter_count(models.disc.parameters())

    def replicated(label: str, size: int) -> Row:
        return Row(label, size, size)

    text_label = f"text encoder: {models.text_encoder_name}"
    if models.text_encoder is not None:
        text_label += f" ({millions(models.text_encoder.parameters())}, frozen, fp32)"
    return [
        Row(f"policy weights, fp32 master ({policy_params / 1e6:.0f}M params; LoRA: frozen, + adapter "
            f"{adapter_params / 1e6:.1f}M)", policy, policy * shard, lora=policy + adapter),
        Row("policy gradients (fp32; LoRA: the adapter's)", policy, policy * shard, lora=adapter),
        Row("policy AdamW states (2 x fp32; LoRA: the adapter's)", 2 * policy, 2 * policy * shard, lora=2 * adapter),
        Row("policy EMA (fp32; LoRA: the adapter's)", state_bytes(models.policy), state_bytes(models.policy), lora=adapter),
        Row("frozen reference policy (fp32; 0 with reference=ema, or LoRA: the adapter switched off)",
            state_bytes(models.policy), state_bytes(models.policy), lora=0),
        replicated(text_label, state_bytes(models.text_encoder)),
        replicated(f"VQ-16 encoder + decoder ({millions(models.vq.parameters())} params, fp32)",
                   state_bytes(models.vq)),
        replicated(f"decoder gradients + AdamW ({decoder_params / 1e6:.1f}M trained params, 3 x fp32)",
                   3 * decoder_params * FP32_BYTES),
        replicated("EMA VQ model (fp32)", state_bytes(models.vq_ema)),
        replicated(f"PatchGAN discriminator + gradients + AdamW ({millions(models.disc.parameters())})",
                   state_bytes(models.disc) + 3 * disc_params * FP32_BYTES),
        replicated(f"perceptual LPIPS-VGG16 ({millions(models.perceptual.parameters())}, fp32)",
                   state_bytes(models.perceptual)),
        replicated(f"reward {models.reward_name} ({millions(models.reward.model.parameters())}, fp32)",
                   state_bytes(models.reward.model)),
    ]  # fmt: skip


def phase_rows(
    models: RunModels, policy_params: int, setting: Setting, policy_act: Activations, decoder_act: Activations,
    decoder_batch: str, adapter_params: int,
) -> list[Row]:  # fmt: skip
    """What exists only during one phase of a step, on top of the held rows."""
    cfg_rows = 2 * setting.rollouts  # classifier-free guidance: a conditional and an unconditional row each
    seq_len = models.text_positions + models.image_tokens
    dtype, element = setting.precision, setting.compute_bytes
    kv = kv_cache_bytes(models.kv_layers, cfg_rows, models.kv_heads, seq_len, models.head_dim, element)
    blocks = list(models.policy_blocks)
    root_params = policy_params - sum(parameter_count(block.parameters()) for block in blocks)
    # FSDP2 gathers weights in the compute dtype (bf16 with bf16 runs): the root unit (embeddings,
    # head) stays gathered during the pass, and about two blocks are gathered at a time (the
    # running one and the prefetched one).
    fsdp_gathered = (root_params + 2 * parameter_count(blocks[0].parameters())) * element
    policy_passes = ("policy pass", "policy pass, checkpointed")
    micro, shard = setting.micro, 1 / setting.gpus
    return [
        Row(f"rollout: KV cache, {dtype}, {cfg_rows} rows x {seq_len} positions", kv, kv, ("rollout",)),
        Row(f"rollout: whole policy gathered for sampling (FSDP, {dtype})", 0, policy_params * element, ("rollout",)),
        Row("policy pass: autocast's bf16 weight copies (DDP, measured) / FSDP gathered units",
            policy_act.weight_copies, fsdp_gathered, policy_passes),
        Row(f"policy pass: activations, micro-batch {micro}", policy_act.plain, policy_act.plain, ("policy pass",)),
        Row(f"policy pass: activations, micro-batch {micro}, checkpointed", policy_act.checkpointed,
            policy_act.checkpointed, ("policy pass, checkpointed",)),
        Row("policy step: foreach AdamW temporary (one fp32 copy)", policy_params * FP32_BYTES,
            policy_params * FP32_BYTES * shard, ("policy step",), lora=adapter_params * FP32_BYTES),
        Row(f"decoder stage: activations ({decoder_batch})", decoder_act.plain + decoder_act.weight_copies,
            decoder_act.plain + decoder_act.weight_copies, ("decoder stage",)),
        Row("decoder stage: activations, decoder checkpointed", decoder_act.checkpointed + decoder_act.weight_copies,
            decoder_act.checkpointed + decoder_act.weight_copies, ("decoder stage, checkpointed",)),
        # `ranke.parallel.full_state_dict` / `optimizer_state_dict` gather one tensor at a time and
        # move it to the main process's CPU memory (cpu_offload): one whole fp32 tensor on the GPU.
        Row("checkpoint save: largest whole fp32 tensor, gathered (FSDP)", 0,
            max(p.numel() for p in models.policy.parameters()) * FP32_BYTES, ("checkpoint save",)),
    ]  # fmt: skip


def peak_row(label: str, held: list[Row], phases: list[Row], names: tuple[str, ...]) -> Row:
    """Held rows plus the largest phase (each column on its own: the largest phase may differ)."""
    peaks, largest = [], []
    for column in COLUMNS:
        per_phase = {name: sum(row.bytes(column) for row in phases if name in row.phases) for name in names}
        largest.append(max(per_phase, key=per_phase.get))
        peaks.append(sum(row.bytes(column) for row in held) + per_phase[largest[-1]])
    at = " / ".join(dict.fromkeys(largest))  # each phase once, in column order
    return Row(f"{label} (largest phase: {at})", peaks[0], peaks[1], total=True, lora=peaks[2])


def estimate(model_name: str, setting: Setting) -> Estimate:
    start = time.perf_counter()
    run_cfg = config_lib.load(RunConfig, PRESETS[model_name])
    pcfg = run_cfg.posttrain
    setting = replace(setting, precision=setting.precision or run_cfg.precision)
    micro = setting.micro
    with FakeTensorMode():
        models = BUILDERS[model_name](pcfg, setting.reward)
        policy_params = parameter_count(models.policy.parameters())
        adapter_params = lora_parameter_count(models.policy, models.lora_targets, LORA.rank)
        policy_act = policy_activations(models, micro, setting)
        decoder_act = decoder_stage_activations(models, pcfg, setting.prompts_per_gpu, setting)
        held = held_rows(models, policy_params, 1 / setting.gpus, adapter_params)
        selected = setting.prompts_per_gpu * pcfg.rank_top_k
        decoder_batch = f"{setting.prompts_per_gpu} real + {selected} selected images"
        phases = phase_rows(models, policy_params, setting, policy_act, decoder_act, decoder_batch, adapter_params)
    rows = [
        *held,
        Row("held throughout", *(sum(row.bytes(column) for row in held) for column in ("ddp", "fsdp")), total=True,
            lora=sum(row.bytes("lora") for row in held)),
        *phases,
        peak_row("peak, no checkpointing", held, phases, PLAIN_PHASES),
        peak_row("peak, policy + decoder checkpointed", held, phases, CHECKPOINTED_PHASES),
    ]
    logits = micro * models.image_tokens * models.vocab * FP32_BYTES
    notes = [
        f"{setting.gpus} GPUs, {setting.prompts_per_gpu} prompts x {setting.group_size} rollouts = "
        f"{setting.rollouts} rollouts per GPU, policy micro-batch {micro}, reward {models.reward_name}, "
        f"precision {setting.precision}",
        f"policy parameters as instantiated: {policy_params:,}; KV cache positions: {models.text_positions} text + "
        f"{models.image_tokens} image tokens",
        f"largest short-lived tensor (not counted): fp32 logits of a micro-batch [{micro}, {models.image_tokens}, "
        f"{models.vocab}] = {logits / GIB:.2f} GiB (reference log-probs, the backward of log-softmax)",
        f"LoRA column: DDP with a rank-{LORA.rank} adapter (alpha {LORA.alpha:g}) on {', '.join(models.lora_targets)}: "
        f"{adapter_params:,} trainable parameters; activations as without it",
        *models.extra_notes,
    ]
    return Estimate(models.title, rows, notes, time.perf_counter() - start)


def print_table(result: Estimate, markdown: bool) -> None:
    if markdown:
        print(f"### {result.title}\n")
        print("| per GPU, GiB | DDP | FSDP | LoRA |")
        print("|---|---:|---:|---:|")
        for row in result.rows:
            label = f"**{row.label}**" if row.total else row.label
            print(f"| {label} | " + " | ".join(f"{row.bytes(column) / GIB:.2f}" for column in COLUMNS) + " |")
        print()
        for note in result.notes:
            print(f"* {note}")
        print()
        return
    width = max(len(row.label) for row in result.rows)
    print(result.title)
    print(f"{'per GPU, GiB':<{width}}  {'DDP':>7}  {'FSDP':>7}  {'LoRA':>7}")
    previous_total = False
    for row in result.rows:
        if row.total and not previous_total:
            print("-" * (width + 27))
        previous_total = row.total
        print(f"{row.label:<{width}}  " + "  ".join(f"{row.bytes(column) / GIB:7.2f}" for column in COLUMNS))
    for note in result.notes:
        print(f"  {note}")
    print(f"  (estimated in {result.seconds:.1f} s)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*PRESETS, "all"], default="all")
    parser.add_argument("--gpus", type=int, default=8, help="FSDP shards the policy over this many GPUs")
    parser.add_argument("--prompts-per-gpu", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=0, help="policy-stage rollouts per forward; 0: all")
    parser.add_argument("--reward", choices=list(REWARD_SIZES), default="clip")
    parser.add_argument("--precision", choices=["bf16", "fp32"], help="default: the preset's (bf16)")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables (docs/memory.md)")
    args = parser.parse_args()
    setting = Setting(args.gpus, args.prompts_per_gpu, args.group_size, args.micro_batch, args.reward, args.precision)
    for name in PRESETS if args.model == "all" else [args.model]:
        print_table(estimate(name, setting), args.markdown)


if __name__ == "__main__":
    main()
