"""The run logger every recipe uses: metrics.jsonl and TensorBoard hold the same numbers, a resume
drops the steps it redoes from both, and bad or unavailable trackers are one-line errors."""

import json
import sys

import pytest
import torch

from ranke.cli import main
from ranke.config import RunConfig
from ranke.runtime import UserError
from ranke.train.logging import RunLogger

CPU = torch.device("cpu")


def tensorboard_scalars(run) -> dict[str, list[tuple[int, float]]]:
    """The (step, value) pairs of every scalar tag in RUN/tensorboard, as TensorBoard reads them
    (events of a purged step dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_tensorboard_matches_jsonl(run, file_name: str = "metrics.jsonl") -> None:
    """Every number of every metrics.jsonl record is in TensorBoard at the record's step (float32)."""
    records = [json.loads(line) for line in (run / file_name).read_text().splitlines()]
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(key, []).append((record["step"], value))
    scalars = tensorboard_scalars(run)
    assert records and scalars.keys() == expected.keys()
    for tag, pairs in expected.items():
        assert [step for step, _ in scalars[tag]] == [step for step, _ in pairs], tag
        assert [value for _, value in scalars[tag]] == pytest.approx([v for _, v in pairs], rel=1e-6, nan_ok=True), tag


def test_jsonl_and_tensorboard_hold_the_same_numbers(tmp_path):
    logger = RunLogger(tmp_path, "tensorboard", RunConfig(), CPU)
    for step in (1, 2, 3):
        logger.log({"step": step, "loss": 1.0 / step, "lr": 0.1 * step, "phase": "warmup", "done": step == 3})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["warmup"] * 3 and records[2]["done"] is True
    assert_tensorboard_matches_jsonl(tmp_path)
    assert set(tensorboard_scalars(tmp_path)) == {"loss", "lr"}  # numbers only


def test_a_resumed_run_drops_the_steps_it_redoes_from_both(tmp_path):
    logger = RunLogger(tmp_path, "tensorboard", RunConfig(), CPU)
    for step in (1, 2, 3, 4):
        logger.log({"step": step, "loss": float(step)})
    logger.close()
    resumed = RunLogger(tmp_path, "tensorboard", RunConfig(), CPU, start_step=2)  # the checkpoint of step 2
    for step in (3, 4):
        resumed.log({"step": step, "loss": 10.0 * step})
    resumed.close()
    assert tensorboard_scalars(tmp_path)["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert_tensorboard_matches_jsonl(tmp_path)
    rerun = RunLogger(tmp_path, "tensorboard", RunConfig(), CPU)  # a fresh run in the same directory replaces the log
    rerun.log({"step": 1, "loss": 5.0})
    rerun.close()
    assert tensorboard_scalars(tmp_path)["loss"] == [(1, 5.0)]
    assert_tensorboard_matches_jsonl(tmp_path)


def test_none_writes_the_jsonl_only(tmp_path):
    logger = RunLogger(tmp_path / "none", "none", RunConfig(), CPU)
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert [p.name for p in (tmp_path / "none").iterdir()] == ["metrics.jsonl"]


@pytest.mark.parametrize("value", ["tensorbord", "tensorboard,mlflow", ""])
def test_an_unknown_tracker_is_one_line(tmp_path, value):
    with pytest.raises(UserError, match=r"give tensorboard, wandb \(comma-separated\) or none"):
        RunLogger(tmp_path, value, RunConfig(), CPU)


def test_wandb_missing_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as it does without the package
    with pytest.raises(SystemExit) as exit_:
        main(["train-tokenizer", "--out", str(tmp_path / "run"), "log_with=tensorboard,wandb"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.strip() == "ranke: error: log_with=wandb needs the wandb package: pip install 'ranke[wandb]'"
    assert not (tmp_path / "run").exists()


def test_wandb_offline_run_in_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = RunLogger(tmp_path, "wandb", RunConfig(), CPU)
    for step in (1, 2):
        logger.log({"step": step, "loss": 1.0 / step})
    logger.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert not (tmp_path / "tensorboard").exists()
