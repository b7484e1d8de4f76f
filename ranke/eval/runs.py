"""What a report reads: each run's evaluation records (the `eval.jsonl` that `ranke posttrain`
wrote, `ranke.train.posttrain.evaluate_step`) and the real-image reference every evaluation of
the study shares. Runs of two methods are paired by their training seed (`seed` in the run's
config.yaml)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from ranke.eval.frontier import TrajectoryPoint
from ranke.eval.study import Method
from ranke.images import grid_tiles, save_image_grid

PREVIEW_NROW = 8  # the evaluation grids hold their images 8 per row (ranke.train.posttrain.evaluate_step)


@dataclass
class RealReference:
    """What every evaluation of a report shares: its first prompts with their real images, and
    the metrics of a second real image of every prompt (`Evaluator.real_reference`: where real
    images stand, and FD / KID of two real sets of the evaluation's size, its noise floor)."""

    prompts: list[str]
    images: np.ndarray  # uint8 [k, H, W, 3], the real image of each of `prompts`
    metrics: dict

    @classmethod
    def from_evaluator(cls, evaluator, count: int = 32) -> RealReference:
        images = evaluator.real_images[:count].permute(0, 2, 3, 1).numpy()
        return cls(evaluator.prompts[:count], images, evaluator.real_reference())

    def save(self, out: Path) -> None:
        """`real_reference.json` and `real_samples.png` in `out`."""
        record = {"prompts": self.prompts, "metrics": self.metrics}
        (Path(out) / "real_reference.json").write_text(json.dumps(record, indent=2))
        save_image_grid(torch.from_numpy(self.images).permute(0, 3, 1, 2).float() / 255.0,
                        Path(out) / "real_samples.png", nrow=PREVIEW_NROW)  # fmt: skip

    @classmethod
    def load(cls, out: Path) -> RealReference:
        record = json.loads((Path(out) / "real_reference.json").read_text())
        grid = np.asarray(Image.open(Path(out) / "real_samples.png").convert("RGB"))
        return cls(record["prompts"], grid_tiles(grid, len(record["prompts"]), PREVIEW_NROW), record["metrics"])


def read_eval(run: Path) -> list[dict]:
    path = Path(run) / "eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def trajectory(run: Path, decoder: str) -> list[dict]:
    """The evaluation records of one run for one decoder, by step."""
    return sorted((row for row in read_eval(run) if row["decoder"] == decoder), key=lambda row: row["step"])


def run_seed(run: Path) -> int:
    """The training seed of a run (its config.yaml): what pairs runs of two methods."""
    return int(yaml.safe_load((Path(run) / "config.yaml").read_text())["seed"])


def finals_by_seed(method: Method, decoder: str) -> dict[int, dict]:
    """The last evaluation of every run of `method` with `decoder`, by training seed (runs
    without one are skipped)."""
    finals = {}
    for run in method.runs:
        rows = trajectory(run, decoder)
        if rows:
            finals[run_seed(run)] = rows[-1]
    return finals


def final_metrics(method: Method, decoder: str) -> list[dict]:
    """The last evaluation of every run of `method` with `decoder`, in seed order."""
    finals = finals_by_seed(method, decoder)
    return [finals[seed] for seed in sorted(finals)]


def values_of(rows: list[dict], key: str) -> list[float] | None:
    """Metric `key` of every row; None when a row lacks it (a run evaluated before the metric existed)."""
    return [row[key] for row in rows] if all(key in row for row in rows) else None


def metric_by_seed(method: Method, key: str) -> dict[int, float]:
    """A method's final value of metric `key` by training seed (its table row's decoder; seeds
    whose run lacks the metric are left out)."""
    return {seed: row[key] for seed, row in finals_by_seed(method, method.decoder).items() if key in row}


def frontier_by_seed(method: Method, sft: dict, key: str) -> dict[int, list[TrajectoryPoint]]:
    """Per training seed, the run's trajectory in the reward-fidelity plane: (reward gain over the
    SFT start, metric `key`) at the start and at every evaluation of its table row's decoder
    (`ranke.eval.frontier`); runs without evaluations, or evaluated before `key` existed, are left out."""
    by_seed = {}
    for run in method.runs:
        rows = trajectory(run, method.decoder)
        if rows and all(key in row for row in rows):
            start = TrajectoryPoint(0.0, sft[key])
            by_seed[run_seed(run)] = [start] + [TrajectoryPoint(row["reward"] - sft["reward"], row[key]) for row in rows]
    return by_seed
