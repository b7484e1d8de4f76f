"""The run log shared by the recipes: metrics.jsonl plus TensorBoard or Weights & Biases (run
set-up: `ranke.train.run`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ranke import config as config_lib
from ranke.runtime import UserError, warn


def finite_record(record: dict) -> dict:
    """`record` with every non-finite number replaced by null and their count under
    `nonfinite_metrics` (JSON has no NaN or infinity)."""
    clean, bad = {}, 0
    for name, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            value, bad = None, bad + 1
        clean[name] = value
    return {**clean, "nonfinite_metrics": bad} if bad else clean


class MetricsWriter:
    """Append one JSON object per line; flushed at every write so a crash loses nothing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(finite_record(record), allow_nan=False) + "\n")

    def drop_after(self, step: int) -> None:
        """Remove records of steps after `step`: on resume they are redone from the checkpoint.

        A line that is not JSON (torn by a crash or a full disk) is dropped with a warning."""
        if not self.path.is_file():
            return
        kept = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                warn(f"{self.path}:{number}: dropped a damaged line (not a JSON record)")
        self.path.write_text("".join(line + "\n" for line in kept))


TRACKERS = ("tensorboard", "wandb")


def tracker_names(log_with: str) -> list[str]:
    """The trackers named by the `log_with` config value: comma-separated names of TRACKERS, or
    "none". `wandb` must be importable (the `wandb` extra)."""
    names = [] if log_with.strip() == "none" else [name.strip() for name in log_with.split(",")]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown or not log_with.strip():
        raise UserError(f"log_with={log_with!r}: give {', '.join(TRACKERS)} (comma-separated) or none")
    if "wandb" in names:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("log_with=wandb needs the wandb package: pip install 'ranke[wandb]'") from None
    return names


class RunLogger:
    """The scalar log of one run, the same for every recipe.

    `log(record)` appends the record (a dict with "step") to `RUN/<file_name>` (MetricsWriter) and
    sends its numbers to the trackers of `log_with` through accelerate's tracker classes:
    TensorBoard events in `RUN/tensorboard/`; a Weights & Biases run (project "ranke", named after
    the run directory, its files in RUN, `config` (a config dataclass) as its configuration;
    `WANDB_MODE=offline` keeps it off the network). A run that starts at `start_step` (0, or the
    step of the checkpoint it resumes) first drops the records of later steps, from the jsonl and
    from TensorBoard (purge_step), so that a resumed run reads as one run and a rerun replaces the
    old one. Only the main process logs.
    """

    def __init__(
        self,
        run: str | Path,
        log_with: str,
        config,
        device: torch.device,
        start_step: int = 0,
        file_name: str = "metrics.jsonl",
    ):
        from accelerate import PartialState
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        # the recipes' Accelerator(cpu=device.type == "cpu") has set this up already; the trackers need it
        main_process = PartialState(cpu=device.type == "cpu").is_main_process
        self.run = Path(run)
        self.metrics = MetricsWriter(self.run / file_name) if main_process else None
        self.trackers = []
        if not main_process:
            return
        self.metrics.drop_after(start_step)
        for name in tracker_names(log_with):
            if name == "tensorboard":
                tracker = TensorBoardTracker("tensorboard", self.run, purge_step=start_step + 1)
            else:
                settings = {"name": self.run.resolve().name, "dir": str(self.run), "config": config_lib.to_dict(config)}
                tracker = WandBTracker("ranke", **settings)
            tracker.start()
            self.trackers.append(tracker)

    def log(self, record: dict) -> None:
        if self.metrics is None:
            return
        self.metrics.write(record)
        scalars = {key: value for key, value in record.items() if key != "step" and _is_number(value)}
        for tracker in self.trackers:
            tracker.log(scalars, step=record["step"])

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
