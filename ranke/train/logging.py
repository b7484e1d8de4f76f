"""Run directories shared by the recipes: set-up and metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ranke import config as config_lib
from ranke.config import RunConfig
from ranke.runlock import claim_output_dir
from ranke.runtime import check_precision, seed_everything, select_device, warn


def start_run(config_path: str, out_dir: str, overrides: list[str], section: str) -> tuple[RunConfig, Path, torch.device]:
    """Resolve (and validate) the config for recipe `section`, create and lock the run directory,
    seed the global generators and pick the device. The recipe writes config.yaml
    (`write_run_config`) once it has accepted the run (`ranke.train.resume.resume_point`)."""
    cfg = config_lib.load(RunConfig, config_path, overrides, section=section)
    check_precision(cfg.precision)
    claim_output_dir(out_dir)
    seed_everything(cfg.seed)
    return cfg, Path(out_dir), select_device(cfg.device)


def write_run_config(cfg: RunConfig, run: Path) -> None:
    config_lib.save(cfg, run / "config.yaml")


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
