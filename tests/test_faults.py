"""Faults injected into real post-training runs: a NaN in a reward, in the decoder loss and in the
policy loss. Each step that sees one is skipped (no update, EMA untouched), counted in the
metrics, and every weight stays finite; metrics.jsonl stays strict JSON; too many skips in a row
stop the run with one line. The injection wraps the real function and corrupts its output at
chosen calls; everything else runs unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_posttrain import LORA, TINY
from test_recipes import TINY_TOKENIZER

from ranke.cli import main
from ranke.train import posttrain, tokenizer
from ranke.train.guard import StepGuard, first_nonfinite
from ranke.train.logging import MetricsWriter
from ranke.train.posttrain import train_posttrain
from ranke.train.tokenizer import train_tokenizer

SETTINGS = [*TINY, "mode=both", "steps=3", "disc_start=0", "save_every=1", "grid_every=100", "policy_ema_every=1"]
STEMS = ("policy", "policy_ema", "vq", "vq_ema", "discriminator")


def strict_records(run: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON (NaN and Infinity refused)."""

    def refuse(constant):
        raise ValueError(f"non-JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path, step: int, stem: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:06d}" / f"{stem}.safetensors")


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[name], b[name]) for name in a)


def assert_all_finite(run: Path) -> None:
    for step in (1, 2, 3):
        for stem in STEMS:
            for name, tensor in weights(run, step, stem).items():
                assert torch.isfinite(tensor.float()).all(), f"step {step} {stem}.{name} is not finite"


def nan_on_calls(function, calls: set[int]):
    """`function` whose output (the first element of a tuple) is multiplied by NaN on the given
    1-based calls."""
    count = 0

    def wrapped(*args, **kwargs):
        nonlocal count
        count += 1
        result = function(*args, **kwargs)
        if count not in calls:
            return result
        if isinstance(result, tuple):
            return (result[0] * float("nan"), *result[1:])
        return result * float("nan")

    return wrapped


class NaNRewardAt:
    """The real toy CLIP reward, with the first image's score replaced by NaN on chosen calls."""

    def __init__(self, reward, calls: set[int]):
        self.reward, self.calls, self.count = reward, calls, 0
        self.name, self.differentiable = reward.name, reward.differentiable

    def __call__(self, images, prompts):
        self.count += 1
        scores = self.reward(images, prompts)
        if self.count in self.calls:
            scores = torch.cat([torch.full_like(scores[:1], float("nan")), scores[1:]])
        return scores


@pytest.mark.parametrize(
    "function, optimizer, term, trained, other, extra",
    [
        ("policy_loss", "policy", "policy/loss", "policy", "vq", []),
        ("policy_loss", "policy", "policy/loss", "policy", "vq", LORA),  # the adapter's optimizer: the policy's guard
        ("decoder_consistency_loss", "decoder", "decoder/consistency", "vq", "policy", []),
    ],
)
def test_nan_loss_skips_that_step_of_that_stage(
    tmp_path, monkeypatch, one_thread, function, optimizer, term, trained, other, extra
):  # fmt: skip
    """A NaN in step 2's policy loss (or a decoder loss term): that stage skips step 2 only."""
    run = tmp_path / "run"
    monkeypatch.setattr(posttrain, function, nan_on_calls(getattr(posttrain, function), {2}))
    train_posttrain("toy", str(run), [*SETTINGS, *extra])
    rows = strict_records(run)
    assert [row[f"skipped/{optimizer}"] for row in rows] == [0, 1, 1]
    assert rows[1][term] is None and rows[1]["nonfinite_metrics"] >= 1
    assert same(weights(run, 1, trained), weights(run, 2, trained))  # no update at step 2
    assert same(weights(run, 1, f"{trained}_ema"), weights(run, 2, f"{trained}_ema"))  # EMA untouched
    assert not same(weights(run, 2, trained), weights(run, 3, trained))  # step 3 trains again
    assert not same(weights(run, 1, other), weights(run, 2, other))  # the other stage is not affected
    assert_all_finite(run)


def test_nan_tokenizer_loss_skips_that_step(tmp_path, monkeypatch, one_thread):
    """The other recipes step through the same guard: the tokenizer's reconstruction loss here."""
    monkeypatch.setattr(tokenizer, "reconstruction_loss", nan_on_calls(tokenizer.reconstruction_loss, {2}))
    run = tmp_path / "tokenizer"
    settings = ["tokenizer.steps=2", "tokenizer.save_every=1", "tokenizer.restart_dead_codes_every=0"]
    train_tokenizer("toy", str(run), [*TINY_TOKENIZER, *settings])
    rows = strict_records(run)
    assert [row["skipped/vq"] for row in rows] == [0, 1] and rows[1]["recon"] is None
    step_1, step_2 = weights(run, 1, "vq"), weights(run, 2, "vq")  # keep_last=2: both checkpoints are there
    step_1.pop("quantize.codebook_used"), step_2.pop("quantize.codebook_used")  # a usage buffer, not a weight
    assert same(step_1, step_2)
    assert all(torch.isfinite(tensor).all() for tensor in weights(run, 2, "vq").values())


def test_nan_reward_is_counted_and_its_decoder_term_skipped(tmp_path, monkeypatch, one_thread):
    """Calls per step: the rollout's scores, then the decoder stage's differentiable scores. A NaN
    in step 2's rollout counts as 0 (the policy still trains); in its decoder term it skips the
    decoder step."""
    from ranke.rewards import toy_clip

    real_loader = toy_clip.load_toy_clip
    monkeypatch.setattr(toy_clip, "load_toy_clip", lambda *a, **k: NaNRewardAt(real_loader(*a, **k), {3, 4}))
    run = tmp_path / "run"
    train_posttrain("toy", str(run), SETTINGS)
    rows = strict_records(run)
    assert [row["reward/toy_clip_nonfinite"] for row in rows] == [0, 1, 0]
    assert all(row["reward"] is not None for row in rows)
    assert [row["skipped/decoder"] for row in rows] == [0, 1, 1]
    assert [row["skipped/policy"] for row in rows] == [0, 0, 0]
    assert same(weights(run, 1, "vq"), weights(run, 2, "vq"))
    assert not same(weights(run, 1, "policy"), weights(run, 2, "policy"))
    assert_all_finite(run)


def test_consecutive_skips_stop_the_run_with_one_line(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(posttrain, "policy_loss", nan_on_calls(posttrain.policy_loss, {2, 3}))
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["posttrain", "--out", str(run), *SETTINGS, "mode=policy", "max_consecutive_skips=2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "step 3: policy/loss is not finite for 2 consecutive policy steps (max_consecutive_skips=2)" in err[0]
    assert (run / "checkpoints" / "step_000002").is_dir() and not (run / "checkpoints" / "step_000003").exists()
    assert [row["skipped/policy"] for row in strict_records(run)] == [0, 1]


def test_guard_names_the_first_nonfinite_term_and_resets_after_a_good_step():
    assert first_nonfinite({"a": 1.0, "b": torch.tensor([0.0, float("inf")]), "c": float("nan")}) == "b"
    assert first_nonfinite({"a": torch.zeros(3), "b": 2}) is None
    guard = StepGuard("decoder", max_consecutive=2)
    assert not guard.allow(1, {"loss": float("nan")})
    assert guard.allow(2, {"loss": 1.0})  # a finite step resets the run of skips
    assert not guard.allow(3, {"loss": float("nan")})
    assert guard.metrics() == {"skipped/decoder": 2}
    with pytest.raises(Exception, match="step 4: grad_norm"):
        guard.allow(4, {"loss": 1.0, "grad_norm": float("inf")})


def test_metrics_writer_writes_nonfinite_values_as_null(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    writer.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1})
    assert strict_records(tmp_path) == [{"step": 1, "loss": None, "grad_norm": None, "lr": 0.1, "nonfinite_metrics": 2}]


def _guard_on_process(rank: int, init_file: str, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    guard = StepGuard("policy", max_consecutive=0)
    local = [1.0, float("nan") if rank == 1 else 1.0, 1.0]  # step 2 is NaN on the second process only
    results[rank] = [guard.allow(step, {"loss": loss}) for step, loss in enumerate(local, 1)]
    torch.distributed.destroy_process_group()


def test_processes_agree_to_skip_when_one_of_them_sees_a_nan(tmp_path):
    """A skip on one process is a skip on all (an all-reduce of the decision), so replicas never diverge."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_guard_on_process, args=(str(tmp_path / "init"), results), nprocs=2)
        assert dict(results) == {0: [True, False, True], 1: [True, False, True]}
