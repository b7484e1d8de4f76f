"""Atomic checkpoint directories: safetensors weights, a weights-only trainer state, the config
and a manifest; written by the recipes, read by `ranke sample` / `ranke eval`.

Checkpoint layout (ARCHITECTURE.md "Conventions"):

    run_dir/checkpoints/step_000100/
        <stem>.safetensors     one per state dict (policy, decoder, their EMAs, discriminator, ...)
        trainer_state.pt       optimizer states, step, RNG states (loads with weights_only=True)
        config.yaml            the resolved config
        manifest.json          written last: step, file list, each file's size and sha256;
                               marks the directory complete
    run_dir/checkpoints/latest a text file holding the name of the newest complete directory

A checkpoint is written into `.step_000100.tmp`, fsynced, then renamed to its final name,
and only then is `latest` replaced (os.replace), so a crash at any point leaves `latest`
naming a complete checkpoint. `latest` is a plain file rather than a symlink because
symlinks are not portable (Windows, some network and object-store filesystems, archive tools).
A save that fails (a full disk, an I/O error, a second stop signal) removes its partial files
before the error goes on; a full disk becomes one line naming the checkpoint, the space it
needs and the space free.
One process (rank 0) writes a run's checkpoints.

Loading verifies every file against the manifest (size and sha256), so a checkpoint damaged
after it was written (a full disk, a partial copy, bit rot) is refused with one line naming the
file; `load_latest_checkpoint` then falls back to the newest intact checkpoint with a warning.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ranke.runtime import UserError, disk_full, warn

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
CONFIG = "config.yaml"
STEP_DIR = re.compile(r"^step_(\d{6,})$")
TEMP_SUFFIX = ".tmp"
# the file stem of each policy / decoder a post-training checkpoint holds (--policy / --decoder choices)
POLICY_STEMS = {"online": "policy", "ema": "policy_ema"}
DECODER_STEMS = {"online": "vq", "ema": "vq_ema"}


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
    name = f"step_{step:06d}"
    final = checkpoints / name
    temp = checkpoints / f".{name}{TEMP_SUFFIX}"
    pointer = checkpoints / f".{LATEST}{TEMP_SUFFIX}"
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
        if temp.exists():  # left by a crashed save of the same step
            shutil.rmtree(temp)
        _write_directory(temp, tensors, trainer_state, config_yaml, step)
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
        pointer.write_text(name + "\n")
        _fsync_file(pointer)
        os.replace(pointer, checkpoints / LATEST)
        _fsync_dir(checkpoints)
    except BaseException as err:  # BaseException: a second stop signal arrives as one
        shutil.rmtree(temp, ignore_errors=True)
        pointer.unlink(missing_ok=True)
        needed = _tensor_bytes(tensors) + _tensor_bytes(trainer_state) + len(config_yaml)
        if _out_of_space(err, checkpoints, needed):
            previous = latest_checkpoint(run_dir)
            kept = f"the previous checkpoint {previous.name} is intact and latest" if previous else "no checkpoint yet"
            raise disk_full(final, needed, kept) from None
        raise

    if keep_last is not None:
        for _, old in _step_dirs(checkpoints)[:-keep_last]:
            if old != final:
                shutil.rmtree(old)
    return final


def _write_directory(temp: Path, tensors: dict, trainer_state: dict, config_yaml: str, step: int) -> None:
    """Every file of a checkpoint into `temp`, the manifest last, all fsynced."""
    temp.mkdir()
    files = []
    for stem, state in tensors.items():
        save_file(_safetensors_ready(state), temp / f"{stem}.safetensors")
        files.append(f"{stem}.safetensors")
    torch.save(trainer_state, temp / TRAINER_STATE)
    (temp / CONFIG).write_text(config_yaml)
    files += [TRAINER_STATE, CONFIG]
    checksums = {file: {"size": (temp / file).stat().st_size, "sha256": file_sha256(temp / file)} for file in files}
    manifest = {"step": step, "tensors": list(tensors), "files": files, "checksums": checksums}
    (temp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for file in files + [MANIFEST]:
        _fsync_file(temp / file)
    _fsync_dir(temp)


def _out_of_space(error: BaseException, folder: Path, needed: int) -> bool:
    """Whether a failed save ran out of disk space: ENOSPC from Python's own writes, or an error
    of safetensors' or torch's writers (which carry no errno: "I/O error ... (os error 28)",
    "unexpected pos ...") on a filesystem with less room than the checkpoint needs."""
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    if isinstance(error, (RuntimeError, SafetensorError)):
        return folder.is_dir() and shutil.disk_usage(folder).free < needed
    return False


def _tensor_bytes(state) -> int:
    """Bytes of the tensors in a (nested) state: about what its files take."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(value) for value in state)
    return 0


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


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Checkpoints found intact by this process, with each file's (size, mtime) at the time: resolving a
# run directory verifies its newest checkpoint and loading verifies it again, and a multi-GB
# checkpoint should be hashed once; a file whose size or mtime has changed is hashed again. As in
# git's index, files modified within the last RACY_SECONDS are never trusted by their stat alone
# (a change in the same timestamp tick would not show in the mtime).
_INTACT: dict[Path, tuple] = {}
RACY_SECONDS = 2.0


def _file_signature(path: Path, files: list[str]) -> tuple:
    stats = {file: (path / file).stat() for file in (MANIFEST, *files)}
    return tuple((file, stat.st_size, stat.st_mtime_ns) for file, stat in stats.items())


def checkpoint_damage(path: str | Path) -> str | None:
    """Why checkpoint directory `path` cannot be trusted, or None when every file matches its
    manifest (size and sha256; manifests written before checksums were recorded are checked
    for the presence of their files only)."""
    path = Path(path)
    if not path.is_dir():
        return "it does not exist"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files, checksums = list(manifest["files"]), dict(manifest.get("checksums", {}))
    except FileNotFoundError:
        return f"it has no {MANIFEST} (an interrupted save)"
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"its {MANIFEST} is unreadable"
    for file in files:
        if not (path / file).is_file():
            return f"missing {file}"
        expected = checksums.get(file)
        if expected is not None and (path / file).stat().st_size != expected["size"]:
            return f"{file} has {(path / file).stat().st_size} bytes, the manifest says {expected['size']}"
    signature, key = _file_signature(path, files), path.resolve()
    if _INTACT.get(key) == signature:
        return None
    for file in files:
        if file in checksums and file_sha256(path / file) != checksums[file]["sha256"]:
            return f"{file} does not match its sha256 in the manifest"
    if all(time.time_ns() - mtime > RACY_SECONDS * 1e9 for _, _, mtime in signature):
        _INTACT[key] = signature
    return None


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, str]:
    """Read a checkpoint directory -> (tensors by stem, trainer_state, config_yaml), all on CPU.

    Every file is verified against the manifest first; `trainer_state` is loaded with
    torch.load(weights_only=True). Raises UserError when the directory is missing, incomplete or
    damaged.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint directory '{path}' does not exist; pass a checkpoints/step_* directory")
    damage = checkpoint_damage(path)
    if damage is not None:
        raise UserError(f"checkpoint '{path}' is damaged or incomplete ({damage}); use an earlier checkpoint")
    manifest = json.loads((path / MANIFEST).read_text())
    try:
        tensors = {stem: load_file(path / f"{stem}.safetensors", device="cpu") for stem in manifest["tensors"]}
        trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
        config_yaml = (path / CONFIG).read_text(encoding="utf-8")
    except Exception as err:  # an unchecksummed (old) checkpoint can still be torn; safetensors and torch raise many types
        raise UserError(f"checkpoint '{path}' cannot be read ({type(err).__name__}); use an earlier checkpoint") from None
    return tensors, trainer_state, config_yaml


def newest_intact_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run that passes `checkpoint_damage`, warning about each damaged
    one passed over; None when it has no complete checkpoint."""
    for path in _newest_first(run_dir):
        damage = checkpoint_damage(path)
        if damage is None:
            return path
        warn(f"checkpoint '{path}' is damaged ({damage}); trying the previous one")
    return None


def newest_loadable_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a run directory loads from: its newest intact one (`newest_intact_checkpoint`),
    or when none is intact its latest, whose load then names the damage; None when it has none."""
    return newest_intact_checkpoint(run_dir) or latest_checkpoint(run_dir)


def _newest_first(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, the one `latest` names first, then by step, newest first."""
    candidates = [path for _, path in reversed(_step_dirs(Path(run_dir) / CHECKPOINTS))]
    latest = latest_checkpoint(run_dir)
    if latest is not None and latest in candidates:
        candidates.remove(latest)
        candidates.insert(0, latest)
    return candidates


def load_latest_checkpoint(run_dir: str | Path) -> tuple[Path, tuple[dict, dict, str]] | None:
    """The newest intact checkpoint of a run and its contents, or None when it has none.

    A damaged checkpoint (newest first) is skipped with a warning naming what is wrong, so a
    run resumes from the last good state; when none is intact the newest one's error is raised.
    """
    candidates = _newest_first(run_dir)
    first_error = None
    for path in candidates:
        try:
            contents = load_checkpoint(path)
        except UserError as err:
            first_error = first_error or err
            warn(f"{err}; trying the previous one")
            continue
        if path != candidates[0]:
            warn(f"using checkpoint '{path}' (the newest intact one)")
        return path, contents
    if first_error is not None:
        raise UserError(f"no intact checkpoint in '{Path(run_dir) / CHECKPOINTS}' ({first_error})")
    return None
