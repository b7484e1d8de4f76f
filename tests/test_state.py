"""EMA, RNG snapshots (ranke/train/state.py) and atomic checkpoints (ranke/checkpoint.py)."""

import random
import shutil

import numpy as np
import pytest
import torch

from ranke import checkpoint as checkpoint_lib
from ranke.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ranke.runtime import UserError
from ranke.train.state import EMA, restore_rng_state, rng_state


class Tiny(torch.nn.Module):
    """One scalar weight, a tied alias of it, a float buffer and an integer buffer."""

    def __init__(self, value: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([value]))
        self.register_buffer("running", torch.tensor([value]))
        self.register_buffer("count", torch.tensor(0))

    def tie(self):
        self.alias = torch.nn.Module()
        self.alias.weight = self.weight
        return self


def _set(model: Tiny, value: float, count: int) -> None:
    with torch.no_grad():
        model.weight.fill_(value)
        model.running.fill_(value)
        model.count.fill_(count)


def test_ema_decay_half_twice():
    model = Tiny(2.0)
    ema = EMA(model, decay=0.5)
    _set(model, 4.0, 1)
    ema.update(model)  # 0.5 * 2 + 0.5 * 4 = 3
    _set(model, 8.0, 2)
    ema.update(model)  # 0.5 * 3 + 0.5 * 8 = 5.5
    assert ema.module.weight.item() == 5.5
    assert ema.module.running.item() == 5.5
    assert ema.module.count.item() == 2  # integer buffers are copied
    assert not ema.module.weight.requires_grad and not ema.module.training
    assert model.weight.item() == 8.0  # the model itself is untouched


def test_ema_updates_tied_weights_once():
    model = Tiny(2.0).tie()
    ema = EMA(model, decay=0.5)
    assert ema.module.alias.weight is ema.module.weight
    _set(model, 4.0, 0)
    ema.update(model)
    # once: 3.0 (twice would give 0.5 * 3 + 0.5 * 4 = 3.5)
    assert ema.module.weight.item() == 3.0


def test_ema_keeps_fp32_shadow_of_bf16_model_and_round_trips():
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(model, decay=0.999)
    assert ema.module.weight.dtype == torch.float32
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    # the lerp is done and kept in fp32: before + 0.001 * (model - before)
    assert torch.equal(ema.module.weight, before.lerp(model.weight.float(), 0.001))
    other = EMA(torch.nn.Linear(4, 4), decay=0.999)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.module.weight, ema.module.weight)


def _draws(generators):
    return (
        torch.rand(3).tolist(),
        np.random.rand(3).tolist(),
        [random.random() for _ in range(3)],
        torch.rand(3, generator=generators["torch"]).tolist(),
        generators["pcg"].random(3).tolist(),
        generators["mt"].normal(size=3).tolist(),
    )


def test_rng_round_trip_all_kinds(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's legacy state
    generators = {
        "torch": torch.Generator().manual_seed(4),
        "pcg": np.random.default_rng(5),
        "mt": np.random.Generator(np.random.MT19937(6)),
    }
    snapshot = rng_state(generators)
    # through a weights_only file, as in a checkpoint
    torch.save(snapshot, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    first = _draws(generators)
    restore_rng_state(loaded, generators)
    assert _draws(generators) == first


def test_rng_restore_refuses_unknown_generator():
    snapshot = rng_state({"data": np.random.default_rng(0)})
    with pytest.raises(UserError, match="'noise'"):
        restore_rng_state(snapshot, {"noise": torch.Generator()})
    with pytest.raises(TypeError):
        rng_state({"bad": random.Random(0)})


def _tensors():
    torch.manual_seed(0)
    shared = torch.randn(3, 4)
    return {
        "policy": {
            "embed.weight": shared,
            "head.weight": shared,  # tied: shares storage
            "proj.weight": torch.randn(4, 3).t(),  # not contiguous
            "norm.weight": torch.randn(5).to(torch.bfloat16),
            "steps": torch.tensor([7], dtype=torch.int64),
        },
        "decoder": {"conv.weight": torch.randn(2, 3, 3, 3)},
    }


def _trainer_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return {"step": 10, "optimizer": optimizer.state_dict(), "rng": rng_state({"data": np.random.default_rng(0)})}


def test_save_load_round_trip_bit_identical(tmp_path):
    tensors = _tensors()
    path = save_checkpoint(tmp_path, 10, tensors, _trainer_state(), "seed: 1\n")
    assert path == tmp_path / "checkpoints" / "step_000010"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000010"
    assert latest_checkpoint(tmp_path) == path

    loaded, trainer_state, config_yaml = load_checkpoint(path)
    assert set(loaded) == {"policy", "decoder"}
    for stem, state in tensors.items():
        for name, tensor in state.items():
            assert loaded[stem][name].dtype == tensor.dtype
            assert torch.equal(loaded[stem][name], tensor), name
    assert trainer_state["step"] == 10
    assert config_yaml == "seed: 1\n"
    # the optimizer state restores into a fresh optimizer
    optimizer = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    optimizer.load_state_dict(trainer_state["optimizer"])
    assert optimizer.state_dict()["state"][0]["step"].item() == 1.0


def test_trainer_state_loads_with_weights_only(tmp_path):
    path = save_checkpoint(tmp_path, 1, {}, _trainer_state(), "")
    direct = torch.load(path / "trainer_state.pt", weights_only=True)
    assert direct["rng"]["generators"]["data"]["kind"] == "numpy"
    # what weights_only would refuse at resume is refused at save time
    with pytest.raises(TypeError, match=r"trainer_state\['rng'\]"):
        save_checkpoint(tmp_path, 2, {}, {"rng": np.random.get_state()}, "")


def test_an_error_mid_save_removes_the_partial_and_keeps_previous_latest(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, _tensors(), {"step": 1}, "a: 1\n")
    written = []

    def crash(*args, **kwargs):
        written.extend(path.name for path in (tmp_path / "checkpoints" / ".step_000002.tmp").iterdir())
        raise RuntimeError("simulated crash after the safetensors files were written")

    monkeypatch.setattr(checkpoint_lib.torch, "save", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, _tensors(), {"step": 2}, "a: 2\n")
    monkeypatch.undo()

    checkpoints = tmp_path / "checkpoints"
    assert "policy.safetensors" in written  # the error really came mid-save
    assert not (checkpoints / ".step_000002.tmp").exists()
    assert (checkpoints / "latest").read_text().strip() == "step_000001"
    assert load_checkpoint(latest_checkpoint(tmp_path))[1] == {"step": 1}


def test_a_killed_saves_leftover_is_never_loaded_and_is_replaced(tmp_path):
    save_checkpoint(tmp_path, 1, _tensors(), {"step": 1}, "a: 1\n")
    checkpoints = tmp_path / "checkpoints"
    partial = checkpoints / ".step_000002.tmp"  # what a process killed mid-save leaves: files, no manifest
    partial.mkdir()
    shutil.copyfile(checkpoints / "step_000001" / "policy.safetensors", partial / "policy.safetensors")
    assert latest_checkpoint(tmp_path) == checkpoints / "step_000001"
    with pytest.raises(UserError, match="incomplete"):
        load_checkpoint(partial)

    # the next save of the same step replaces the leftover temporary directory
    save_checkpoint(tmp_path, 2, _tensors(), {"step": 2}, "a: 2\n")
    assert not partial.exists()
    assert latest_checkpoint(tmp_path) == checkpoints / "step_000002"


def test_latest_falls_back_to_newest_complete_directory(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 1, {}, {"step": 1}, "")
    save_checkpoint(tmp_path, 2, {}, {"step": 2}, "")
    # a crash between the rename and the pointer update leaves no (or an old) pointer
    (tmp_path / "checkpoints" / "latest").unlink()
    (tmp_path / "checkpoints" / ".step_000003.tmp").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000002"


def test_keep_last_and_resave_same_step(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, {}, {"step": step}, "", keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000003", "step_000004"]
    save_checkpoint(tmp_path, 4, {}, {"step": 40}, "", keep_last=2)
    assert load_checkpoint(latest_checkpoint(tmp_path))[1] == {"step": 40}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == names


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    path = save_checkpoint(tmp_path, 1, _tensors(), {"step": 1}, "")
    (path / "decoder.safetensors").unlink()
    with pytest.raises(UserError, match="missing decoder.safetensors"):
        load_checkpoint(path)
