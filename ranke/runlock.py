"""One writer per output folder: an advisory lock on `DIR/.lock`.

Every command that writes a folder it may later resume (training runs, sample and evaluation
folders) holds `fcntl.flock` on `DIR/.lock` while it runs, with its pid written in the file. A
second writer is refused with one line naming the holder. The kernel releases a flock when its
process ends, however it ends (kill -9 included), so a lock left by a dead process is free and is
taken over; its pid, still in the file (a clean exit empties it), is named in a warning. Under `torchrun` / `accelerate launch` only the main process (RANK 0)
locks: the others write nothing the main process does not coordinate.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path

from ranke.runtime import UserError, warn

LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # folder -> open descriptor holding its lock, for this process


def prepare_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create folder `path` (and parents), with one line when it cannot be one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} '{path}' is an existing file, not a folder; choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag} '{path}' cannot be created ({err.strerror}); choose another {flag}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} '{path}' is not writable; choose another {flag}")
    return path


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def claim_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create `path` if needed and, on the main process, hold its lock until this process exits
    (or `release`). Claiming a folder this process already holds is a no-op, unless the folder was
    removed and made again since (a notebook deleting a run and starting it afresh): then its new
    lock file is claimed."""
    import fcntl

    path = prepare_output_dir(path, flag).resolve()
    if not _is_main_process():
        return path
    lock = path / LOCK_FILE
    if path in _held:
        if _holds_file(_held[path], lock):
            return path
        os.close(_held.pop(path))  # the folder was removed and made again since: its new lock file is free
    try:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"cannot create the lock file '{lock}' ({err.strerror}); choose another {flag}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise UserError(
            f"'{path}' is in use by another ranke process (pid {holder}); wait for it to finish or choose another {flag}"
        ) from None
    previous = os.pread(descriptor, 64, 0).decode(errors="replace").strip()
    if previous and previous != str(os.getpid()):
        warn(f"'{path}' was left locked by pid {previous}, which is no longer running; taking it over")
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    _held[path] = descriptor
    return path


def _holds_file(descriptor: int, lock: Path) -> bool:
    """Whether `descriptor` is open on the file now at `lock` (not on one removed since)."""
    try:
        now = os.stat(lock)
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def is_held(path: str | Path) -> bool:
    """Whether this process holds the lock on `path`."""
    return Path(path).resolve() in _held


def release(path: str | Path) -> None:
    """Give up this process's lock on `path` (the lock file stays; the next writer takes it)."""
    descriptor = _held.pop(Path(path).resolve(), None)
    if descriptor is not None:
        os.ftruncate(descriptor, 0)  # an empty lock file: released cleanly
        os.close(descriptor)  # closing the last descriptor releases the flock


@atexit.register
def release_all() -> None:
    """Give up every lock this process holds (the CLI does so when its command ends)."""
    for path in list(_held):
        release(path)
