"""Several processes (`accelerate launch`, `torchrun`): how recipes split work and keep replicas equal.

Data parallelism: every process draws the step's whole batch from the same seeded stream and
keeps a contiguous share (`Shard`), so the data do not depend on the number of processes.
Gradients of modules driven through `forward` go through DDP or FSDP; the others (decoder and
discriminator, which recipes call through `decode`) are averaged by `average_gradients`.

Policy sharding (`posttrain.policy_sharding=fsdp`, or a launch with accelerate's FSDP config):
PyTorch FSDP2 (`fully_shard`) over each transformer block and the whole policy, so parameters,
gradients and AdamW states are split over the processes. A forward call gathers the weights it
needs; the sampler, grids and replica checks, which work with whole weights outside `forward`,
run inside `whole_weights(policy)`; checkpoints gather the state tensor by tensor
(`full_state_dict`, `optimizer_state_dict`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta

import torch

from ranke.precision import PrecisionChoice, choose_precision
from ranke.runtime import UserError

POLICY_SHARDINGS = ("ddp", "fsdp")


@dataclass(frozen=True)
class Shard:
    """This process's items of a global batch: [start, end) of `total`. In post-training the
    items are prompts, so every GRPO group and every rank selection stays inside one process."""

    start: int
    end: int
    total: int

    @staticmethod
    def of(accelerator, global_batch: int, what: str = "prompts_per_step") -> Shard:
        world, rank = accelerator.num_processes, accelerator.process_index
        if global_batch % world:
            raise UserError(f"{what}={global_batch} must be a multiple of the {world} processes")
        share = global_batch // world
        return Shard(rank * share, (rank + 1) * share, global_batch)


def process_group_kwargs(collective_timeout: float):
    """accelerate's set-up of the process group with `collective_timeout` seconds as the limit of
    every collective: with gloo a wait beyond it raises (a hung process), with NCCL the watchdog
    ends the process, so no process waits forever for one that died."""
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout))


def collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process is gone or hung:
    torch's DistError (NCCL, the rendezvous store) or gloo's transport errors, which torch raises
    as plain RuntimeErrors ("Connection reset by peer", "Timed out waiting ... for recv")."""
    if isinstance(error, torch.distributed.DistError):
        return True
    return isinstance(error, RuntimeError) and "gloo/transport" in str(error)


def average_gradients(parameters, accelerator) -> None:
    """Average gradients over processes (one all-reduce). The decoder and discriminator run
    through methods other than `forward`, where a DistributedDataParallel wrapper would not see
    the computation, so their gradients are synchronised explicitly."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
        for grad, averaged in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(averaged.view_as(grad))


def mean_over_processes(record: dict, accelerator) -> dict:
    """Every numeric metric averaged over processes (the step number is the same everywhere)."""
    if accelerator.num_processes == 1:
        return record
    names = [name for name in record if name != "step"]
    values = torch.tensor([float(record[name]) for name in names], dtype=torch.float64, device=accelerator.device)
    averaged = accelerator.reduce(values, reduction="mean").tolist()
    return {"step": record["step"], **dict(zip(names, averaged))}


def check_replicas(modules: dict[str, torch.nn.Module], accelerator, step: int) -> None:
    """Fail loudly when the processes' copies of `modules` have drifted apart (a sharded policy
    is compared on its whole weights)."""
    sums = []
    for module in modules.values():
        with whole_weights(module):
            sums.append(torch.stack([p.detach().double().sum() for p in module.parameters()]).sum())
    gathered = accelerator.gather(torch.stack(sums).to(accelerator.device)[None]).view(-1, len(modules))
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError(
            f"step {step}: processes hold different weights ({', '.join(modules)} parameter sums {gathered.tolist()})"
        )


def uses_fsdp(accelerator, policy_sharding: str) -> bool:
    """FSDP when the config asks for it (`POLICY_SHARDINGS`) or the job was launched with accelerate's FSDP config."""
    return policy_sharding == "fsdp" or accelerator.distributed_type.name == "FSDP"


def shard_policy(policy: torch.nn.Module, bf16_communication: bool) -> torch.nn.Module:
    """FSDP2 in place: each transformer block (`policy.transformer_blocks()`) is one unit, the
    rest (embeddings, caption projection, head) the root unit. With `bf16_communication` the
    gathered weights are bfloat16 and gradients are reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    precision = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16_communication else None, reduce_dtype=torch.float32
    )
    for block in policy.transformer_blocks():
        fully_shard(block, mp_policy=precision)
    fully_shard(policy, mp_policy=precision)
    # FSDP2 picks its root at the first forward; the sampler calls the blocks without the root's
    # forward, so the root is set now (there is no public call for it in torch 2.13)
    policy._get_fsdp_state()._lazy_init()
    return policy


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def whole_weights(module: torch.nn.Module):
    """Inside: `module`'s parameters are its whole (unsharded) weights on every process, usable
    by code that does not go through `forward` (sampling, grids, replica checks). Nothing to do
    when not sharded."""
    if not is_sharded(module):
        yield module
        return
    from torch.distributed.fsdp import FSDPModule

    units = [unit for unit in module.modules() if isinstance(unit, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False)  # the sampler's per-token block calls keep the weights
    try:
        yield module
    finally:
        for unit in units:
            unit.set_reshard_after_forward(True)
            unit.reshard()


# Whole state dicts of a sharded module are gathered one tensor at a time into CPU memory of the
# main process (the one that writes checkpoints); the others get empty dicts.
SAVE_OPTIONS = {"full_state_dict": True, "cpu_offload": True}


def full_state_dict(module: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The module's whole weights, or with `trainable_only` its trainable parameters alone (a LoRA
    adapter's: no frozen weight is gathered). A collective when sharded: call it on all processes;
    then only the main process receives them."""
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(**SAVE_OPTIONS, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(module, options=options)
    else:
        state = module.state_dict()
    if not trainable_only:
        return state
    # buffers are not parameters: kept by `ignore_frozen_params`, dropped here
    return {name: state[name] for name, parameter in module.named_parameters() if parameter.requires_grad and name in state}


def optimizer_state_dict(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state for the whole weights (parameter names as keys when sharded, so a
    checkpoint does not depend on the number of processes; a collective, as `full_state_dict`)."""
    if not is_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(**SAVE_OPTIONS))


def load_optimizer_state_dict(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `optimizer_state_dict`; every process passes the whole state and keeps its shard."""
    if not is_sharded(module):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def clip_gradients(parameters, max_norm: float) -> float:
    """Clip the global gradient norm (over every process's shard when sharded); returns it."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def recipe_precision(cfg, accelerator, recipe: str) -> PrecisionChoice:
    """The run's precision (`ranke.precision.choose_precision`) for the config's `precision`, or bf16
    when the job was launched with `--mixed_precision bf16`. The main process decides, says so in
    one line and the others take its choice, so every process runs the same arithmetic. The choice
    is written into `cfg.precision`, so the run's config.yaml says what ran and a resume keeps it
    (`ranke.train.resume`)."""
    if accelerator.mixed_precision == "fp16":
        raise UserError("fp16 is not supported (it needs loss scaling); launch with --mixed_precision bf16 or no")
    requested = "bf16" if accelerator.mixed_precision == "bf16" else cfg.precision
    choice = [choose_precision(requested, accelerator.device, cfg.gpt.dim) if accelerator.is_main_process else None]
    if accelerator.is_main_process:
        print(f"{recipe}: precision {choice[0].name} ({choice[0].reason})", flush=True)
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    cfg.precision = choice[0].name
    return choice[0]
