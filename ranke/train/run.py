"""What every recipe does around its stages: set the run up, resume it, keep the step cadence,
checkpoint it, and stop it on a signal.

A checkpointing recipe (tokenizer, SFT, post-training) reads

    start = begin_run(config, out_dir, overrides, "sft", resume)   # config, lock, resume point, accelerate
    ...build its models and `GuardedOptimizer`s, restore `start.resumed`...
    return train_recipe((run, start_step), one_step, save, finish)     # log, loop, stop signals

with `one_step(run, logger, step, bar)` the recipe's named stages and its bookkeeping (`due` says which
records, previews and checkpoints a step writes), returning whether it wrote a checkpoint,
`save(run, step)` writing one (`save_recipe_checkpoint`; trainer state: `ranke.train.trainer_state`)
and `finish(run, train_seconds)` its evaluation and asset. Post-training runs `run_steps` itself: it
keeps more outputs than the log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ranke import checkpoint as checkpoint_lib
from ranke import config as config_lib
from ranke.config import RunConfig
from ranke.parallel import mean_over_processes, process_group_kwargs, recipe_precision
from ranke.precision import PrecisionChoice
from ranke.runlock import claim_output_dir
from ranke.runtime import progress, seed_everything, select_device, stop_signal_numbers
from ranke.train.logging import RunLogger, tracker_names
from ranke.train.preemption import Preemption
from ranke.train.resume import resume_point

if TYPE_CHECKING:
    from accelerate import Accelerator


def start_run(config: str | RunConfig, out_dir: str, overrides: list[str], section: str) -> tuple[RunConfig, Path, torch.device]:
    """Resolve (and validate) the config for recipe `section` (a preset name, a YAML file or a
    `RunConfig`, with `key=value` overrides), create and lock the run directory,
    seed the global generators and pick the device. The recipe writes config.yaml
    (`write_run_config`) once it has accepted the run (`ranke.train.resume.resume_point`)."""
    cfg = config_lib.load(RunConfig, config, overrides, section=section)
    stop_signal_numbers(cfg.stop_signals)
    tracker_names(cfg.log_with)  # a bad value or a missing wandb fails before any work
    claim_output_dir(out_dir)
    seed_everything(cfg.seed)
    return cfg, Path(out_dir), select_device(cfg.device)


def write_run_config(cfg: RunConfig, run: Path) -> None:
    config_lib.save(cfg, run / "config.yaml")


@dataclass
class RunStart:
    """A checkpointing recipe's run as `begin_run` sets it up."""

    section: str  # the recipe's config section and name: tokenizer, sft, posttrain
    cfg: RunConfig
    run_dir: Path
    accelerator: Accelerator
    precision: PrecisionChoice  # the forward passes' precision (ranke.precision) and why
    resumed: tuple[dict, dict] | None  # (weights by stem, trainer state) of the checkpoint it continues

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main_process(self) -> bool:
        return self.accelerator.is_main_process


def begin_run(
    config: str | RunConfig,
    out_dir: str,
    overrides: list[str],
    section: str,
    resume: bool,
    check: Callable[[RunConfig], None] | None = None,
    ddp_buckets: bool = False,
) -> RunStart:
    """`start_run`, the recipe's own config `check`, the checkpoint to resume (refused without
    `resume`), then accelerate (one process, or several under
    `accelerate launch` / `torchrun`) and the run's precision. `ddp_buckets`: gradients live in
    DDP's all-reduce buckets rather than in a second copy."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cfg, run_dir, device = start_run(config, out_dir, overrides, section=section)
    if check is not None:
        check(cfg)
    resumed = resume_point(run_dir, cfg, section, resume)
    handlers = [DistributedDataParallelKwargs(gradient_as_bucket_view=True)] if ddp_buckets else []
    accelerator = Accelerator(
        cpu=device.type == "cpu", kwargs_handlers=[*handlers, process_group_kwargs(cfg.collective_timeout)]
    )
    precision = recipe_precision(cfg, accelerator, section)
    contents = None if resumed is None else resumed[1][:2]
    return RunStart(
        section=section, cfg=cfg, run_dir=run_dir, accelerator=accelerator, precision=precision, resumed=contents
    )


def due(step: int, every: int, total: int) -> bool:
    """Whether 1-based step `step` is one of every `every` (0: none) or the last of `total`."""
    return bool(every and step % every == 0) or step == total


def log_record(record: dict, accelerator: Accelerator, logger: RunLogger, bar, postfix: Callable[[dict], dict]) -> None:
    """A step's record averaged over processes (a collective: every process calls it), to the run
    log and, as `postfix(record)`, to the progress bar (main process)."""
    record = mean_over_processes(record, accelerator)
    if accelerator.is_main_process:
        logger.log(record)
        bar.set_postfix(postfix(record))


def save_recipe_checkpoint(
    main_process: bool, run_dir: Path, step: int, tensors: dict, trainer_state: dict, keep_last: int | None
) -> None:
    """Checkpoint `step` of the run in `run_dir` (`ranke.checkpoint`) with its config.yaml: the main
    process writes; the others have joined any collective that gathered `tensors` and `trainer_state`."""
    if main_process:
        config_yaml = (run_dir / "config.yaml").read_text()
        checkpoint_lib.save_checkpoint(run_dir, step, tensors, trainer_state, config_yaml, keep_last=keep_last)


def train_recipe(started: tuple, one_step: Callable, save: Callable, finish: Callable) -> dict:
    """A checkpointing recipe from its start to its end. `started` is (run, start step) as the
    recipe's start function returns it, `run.start` its `RunStart`; then the run log (`RunLogger`,
    records after the start step dropped), `run_steps` over the section's `steps` with
    `one_step(run, logger, step, bar)` and `save(run, step)`, and on the main process
    `finish(run, train_seconds)` (evaluation and asset), whose result it returns ({} on the others)."""
    run, start_step = started
    start = run.start
    logger = RunLogger(start.run_dir, start.cfg.log_with, start.cfg, start.device, start_step)
    begun = time.perf_counter()
    run_steps(
        start.section, start_step, getattr(start.cfg, start.section).steps, start.cfg.stop_signals, start.run_dir,
        start.accelerator, logger, one_step=lambda step, bar: one_step(run, logger, step, bar),
        save=lambda step: save(run, step),
    )  # fmt: skip
    train_seconds = time.perf_counter() - begun
    start.accelerator.wait_for_everyone()
    return finish(run, train_seconds) if start.main_process else {}


def run_steps(
    desc: str,
    start_step: int,
    total: int,
    stop_signals: list[str],
    run_dir: Path,
    accelerator: Accelerator,
    logger: RunLogger,
    one_step: Callable[[int, object], bool],
    save: Callable[[int], None],
) -> None:
    """Steps `start_step`..`total - 1` under a progress bar (`desc`), each `one_step(step, bar)`,
    which says whether it wrote a checkpoint. A stop signal of `stop_signals`
    (`ranke.train.preemption`) stops every process after the same step, with that step's
    checkpoint (`save(step + 1)`) unless it wrote one; the logger is closed either way."""
    main_process = accelerator.is_main_process
    preemption = Preemption(stop_signals, run_dir, accelerator.device, main_process)
    bar = progress(range(start_step, total), total=total, initial=start_step, desc=desc, disable_on_workers=not main_process)
    for step in bar:
        saved = one_step(step, bar)
        if preemption.requested(step + 1):  # a stop signal reached some process: all stop after this step
            logger.close()
            preemption.stop(save=None if saved else lambda: save(step + 1))
    preemption.close()
    logger.close()
