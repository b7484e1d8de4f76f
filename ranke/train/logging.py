"""Run directories shared by the recipes: set-up and metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ranke import config as config_lib
from ranke.config import RunConfig
from ranke.runtime import check_precision, seed_everything, select_device


def start_run(config_path: str, out_dir: str, overrides: list[str], section: str) -> tuple[RunConfig, Path, torch.device]:
    """Resolve the config for recipe `section`, create the run directory with its config.yaml,
    seed the global generators and pick the device."""
    cfg = config_lib.load(RunConfig, config_path, overrides, section=section)
    check_precision(cfg.precision)
    run = Path(out_dir)
    run.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, run / "config.yaml")
    seed_everything(cfg.seed)
    return cfg, run, select_device(cfg.device)


class MetricsWriter:
    """Append one JSON object per line; flushed at every write so a crash loses nothing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def drop_after(self, step: int) -> None:
        """Remove records of steps after `step`: on resume they are redone from the checkpoint."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))
