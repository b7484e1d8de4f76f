"""Checkpoint reading, unwrapping, layout checks and strict loading."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ranke.models.load import (
    check_checkpoint,
    check_checkpoint_report,
    compare_state_dict,
    layout_of,
    load_into,
    read_state_dict,
)
from ranke.models.vq import VQ_PRESETS, VQModel
from ranke.runtime import UserError

LAYOUTS = Path(__file__).parent / "data" / "llamagen_layouts.json"


@dataclass
class TrainingArgs:
    """Stands in for the argparse/config objects some training checkpoints pickle."""

    lr: float = 1e-4


def _vq16_layout() -> dict[str, tuple[int, ...]]:
    return {key: tuple(shape) for key, shape in json.loads(LAYOUTS.read_text())["VQ-16"]}


def _cheap_state_dict(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Tensors of the right shapes backed by one element each (torch.save keeps the strides)."""
    torch.manual_seed(0)
    return {key: torch.randn(1).expand(shape) for key, shape in layout.items()}


def _small_state_dict() -> dict[str, torch.Tensor]:
    return {"encoder.weight": torch.arange(6.0).reshape(2, 3), "encoder.bias": torch.ones(2)}


def test_official_vq16_layout_file_is_accepted(tmp_path):
    path = tmp_path / "vq_ds16_t2i.pt"
    torch.save({"model": _cheap_state_dict(_vq16_layout())}, path)
    assert check_checkpoint(path, _vq16_layout()) == (344, [])
    assert check_checkpoint_report(path, lambda: VQModel(VQ_PRESETS["VQ-16"])) == (True, ["ok 344 tensors"])


def test_single_wrong_shape_is_rejected_by_key(tmp_path):
    state_dict = _cheap_state_dict(_vq16_layout())
    state_dict["quantize.embedding.weight"] = torch.zeros(1).expand(16384, 16)
    path = tmp_path / "bad.pt"
    torch.save({"model": state_dict}, path)
    ok, lines = check_checkpoint_report(path, _vq16_layout())
    assert not ok
    assert lines == [
        "wrong shape: quantize.embedding.weight expected [16384, 8] found [16384, 16]",
        "1 mismatches (344 tensors in the file, 344 expected)",
    ]


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "steps": 100},
        lambda sd: {"module": sd},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
        lambda sd: {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
    ],
    ids=["bare", "model", "module", "state_dict+ddp", "compiled", "ddp+compiled"],
)
def test_wrappers_and_prefixes_are_unwrapped(tmp_path, wrap):
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(_small_state_dict()), path)
    loaded = read_state_dict(path)
    assert list(loaded) == ["encoder.weight", "encoder.bias"]
    torch.testing.assert_close(loaded["encoder.weight"], torch.arange(6.0).reshape(2, 3))


def test_safetensors_round_trip_and_load_into(tmp_path):
    torch.manual_seed(0)
    source = VQModel(VQ_PRESETS["toy"])
    path = tmp_path / "toy.safetensors"
    save_file(source.state_dict(), path)
    torch.manual_seed(1)
    target = VQModel(VQ_PRESETS["toy"])
    load_into(target, read_state_dict(path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_pickled_custom_object_needs_trust(tmp_path):
    path = tmp_path / "train_ckpt.pt"
    torch.save({"model": _small_state_dict(), "args": TrainingArgs()}, path)
    with pytest.raises(UserError, match="pass --trust-checkpoint to allow unpickling if you trust the file") as err:
        read_state_dict(path)
    assert "TrainingArgs" in str(err.value) and "\n" not in str(err.value)
    assert list(read_state_dict(path, trust_pickle=True)) == ["encoder.weight", "encoder.bias"]


def test_bad_files_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_state_dict(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="is not a file"):
        read_state_dict(tmp_path)
    garbage = tmp_path / "notes.pt"
    garbage.write_text("these are my notes, not a checkpoint\n")
    with pytest.raises(UserError, match="is not a readable PyTorch checkpoint"):
        read_state_dict(garbage)
    fake_safetensors = tmp_path / "model.safetensors"
    fake_safetensors.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="is not a readable safetensors file"):
        read_state_dict(fake_safetensors)
    no_tensors = tmp_path / "meta.pt"
    torch.save({"step": 3, "model": {"name": "vq"}}, no_tensors)
    with pytest.raises(UserError, match="holds no tensors"):
        read_state_dict(no_tensors)


def test_compare_state_dict_lines_and_ignore_patterns():
    expected = {"a.weight": (2, 3), "b.weight": (4,), "layers.0.attn.k_cache": (1, 8), "freqs_cis": (16, 2)}
    found = {"a.weight": torch.zeros(3, 2), "c.bias": torch.zeros(5), "layers.1.attn.v_cache": torch.zeros(1)}
    assert compare_state_dict(expected, found, ignore=("*.k_cache", "*.v_cache", "freqs_cis")) == [
        "wrong shape: a.weight expected [2, 3] found [3, 2]",
        "missing: b.weight [4]",
        "unexpected: c.bias [5]",
    ]
    assert len(compare_state_dict(expected, found)) == 6


def test_load_into_is_strict_and_names_mismatches():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(UserError, match=r"wrong shape: weight expected \[2, 3\] found \[3, 3\]"):
        load_into(model, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)})
    with pytest.raises(UserError, match=r"missing: bias \[2\]; unexpected: extra \[1\]"):
        load_into(model, {"weight": torch.zeros(2, 3), "extra": torch.zeros(1)})

    # Ignored keys keep the model's own values; ignored extras in the file are dropped.
    bias = model.bias.detach().clone()
    load_into(model, {"weight": torch.ones(2, 3), "cache": torch.zeros(7)}, ignore=("bias", "cache"))
    assert torch.equal(model.weight, torch.ones(2, 3))
    assert torch.equal(model.bias, bias)
    assert layout_of(model) == {"weight": (2, 3), "bias": (2,)}
