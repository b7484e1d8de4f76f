"""Atomic checkpoint directories: safetensors weights, a weights-only trainer state, the config
and a manifest; written by the recipes, read by `ranke sample` / `ranke eval`.

Checkpoint layout (ARCHITECTURE.md "Conventions"):

    run_dir/checkpoints/step_000100/
        <stem>.safetensors     one per state dict (policy, decoder, their EMAs, discriminator, ...)
        trainer_state.pt       optimizer states, step, RNG states (loads with weights_only=True)
        config.yaml            the resolved config
        manifest.json          written last: step and file list; marks the directory complete
    run_dir/checkpoints/latest a text file holding the name of the newest complete directory

A checkpoint is written into `.step_000100.tmp`, fsynced, then renamed to its final name,
and only then is `latest` replaced (os.replace), so a crash at any point leaves `latest`
naming a complete checkpoint. `latest` is a plain file rather than a symlink because
symlinks are not portable (Windows, some network and object-store filesystems, archive tools).
One process (rank 0) writes a run's checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ranke.runtime import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
CONFIG = "config.yaml"
STEP_DIR = re.compile(r"^step_(\d{6,})$")
TEMP_SUFFIX = ".tmp"


def _check_weights_only(value: Any, where: str = "trainer_state") -> None:
    """Refuse at save time what torch.load(weights_only=True) would refuse at resume time."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            _check_weights_only(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_weights_only(item, f"{where}[{index}]")
    elif not isinstance(value, (torch.Tensor, bool, int, float, str, type(None))):
        raise TypeError(f"{where} is a {type(value).__name__}; keep trainer_state to tensors and Python primitives")


def _safetensors_ready(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no shared storage: safetensors refuses the others
    (tied weights share storage; views and transposes are not contiguous)."""
    ready, seen_storages = {}, set()
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen_storages.add(tensor.untyped_storage().data_ptr())
        ready[name] = tensor
    return ready


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (renames); a no-op where directories cannot be opened (Windows)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _step_dirs(checkpoints: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint directories (final name and a manifest), oldest first."""
    if not checkpoints.is_dir():
        return []
    found = []
    for entry in checkpoints.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and (entry / MANIFEST).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    trainer_state: dict,
    config_yaml: str,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint `step` atomically and point `latest` at it; returns its directory.

    `tensors` maps a file stem to a state dict (saved as `<stem>.safetensors`);
    `trainer_state` must hold only tensors, Python primitives, dicts and lists (optimizer
    state dicts do; use `rng_state` for RNG) so it loads with weights_only=True.
    `keep_last` keeps only the newest `keep_last` complete checkpoints.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    _check_weights_only(trainer_state)
    checkpoints = Path(run_dir) / CHECKPOINTS
    checkpoints.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = checkpoints / name
    temp = checkpoints / f".{name}{TEMP_SUFFIX}"
    if temp.exists():  # left by a crashed save of the same step
        shutil.rmtree(temp)
    temp.mkdir()

    files = []
    for stem, state in tensors.items():
        save_file(_safetensors_ready(state), temp / f"{stem}.safetensors")
        files.append(f"{stem}.safetensors")
    torch.save(trainer_state, temp / TRAINER_STATE)
    (temp / CONFIG).write_text(config_yaml)
    files += [TRAINER_STATE, CONFIG]
    (temp / MANIFEST).write_text(json.dumps({"step": step, "tensors": list(tensors), "files": files}, indent=2))
    for file in files + [MANIFEST]:
        _fsync_file(temp / file)
    _fsync_dir(temp)

    if final.exists():  # re-saving a step (e.g. right after a resume): move the old copy aside first
        replaced = checkpoints / f".{name}.old"
        if replaced.exists():
            shutil.rmtree(replaced)
        os.rename(final, replaced)
        os.rename(temp, final)
        shutil.rmtree(replaced)
    else:
        os.rename(temp, final)
    _fsync_dir(checkpoints)

    pointer = checkpoints / f".{LATEST}{TEMP_SUFFIX}"
    pointer.write_text(name + "\n")
    _fsync_file(pointer)
    os.replace(pointer, checkpoints / LATEST)
    _fsync_dir(checkpoints)

    if keep_last is not None:
        for _, old in _step_dirs(checkpoints)[:-keep_last]:
            if old != final:
                shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none.

    `latest` is trusted when it names a complete directory; otherwise (missing, or a crash
    between the rename and the pointer update) the highest complete `step_*` directory.
    Temporary `.step_*.tmp` directories of interrupted saves are never returned.
    """
    checkpoints = Path(run_dir) / CHECKPOINTS
    pointer = checkpoints / LATEST
    if pointer.is_file():
        named = checkpoints / pointer.read_text().strip()
        if STEP_DIR.match(named.name) and (named / MANIFEST).is_file():
            return named
    complete = _step_dirs(checkpoints)
    return complete[-1][1] if complete else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, str]:
    """Read a checkpoint directory -> (tensors by stem, trainer_state, config_yaml), all on CPU.

    `trainer_state` is loaded with torch.load(weights_only=True). Raises UserError when the
    directory is missing or incomplete.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint directory '{path}' does not exist; pass a checkpoints/step_* directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"checkpoint '{path}' is incomplete (no {MANIFEST}); use an earlier checkpoint")
    manifest = json.loads(manifest_path.read_text())
    missing = [file for file in manifest["files"] if not (path / file).is_file()]
    if missing:
        raise UserError(f"checkpoint '{path}' is incomplete (missing {', '.join(missing)}); use an earlier checkpoint")
    tensors = {stem: load_file(path / f"{stem}.safetensors", device="cpu") for stem in manifest["tensors"]}
    trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    return tensors, trainer_state, (path / CONFIG).read_text()
