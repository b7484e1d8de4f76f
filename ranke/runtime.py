"""Small process-level helpers shared by every recipe: errors, devices, seeding, progress."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


class UserError(Exception):
    """Bad input from the user. The CLI prints the message as one line and exits 2."""


# Exit codes besides 0, 2 (UserError) and 130 (Ctrl-C); docs/distributed.md "What happens on a fault?"
EXIT_STOPPED = 75  # stopped on a signal, resumable with --resume (sysexits' EX_TEMPFAIL: try again later)
EXIT_LOST_PROCESS = 69  # another process of a multi-process job died or hung (sysexits' EX_UNAVAILABLE)


class Stopped(Exception):
    """The run stopped before its end on request (a stop signal) and can be continued with
    --resume. The CLI prints the message as one line and exits EXIT_STOPPED."""


class SecondSignal(BaseException):
    """A stop signal while the run is already stopping (`ranke.train.preemption`). A BaseException,
    so that no `except Exception` on the way (a loader's, a writer's) holds it up."""


def stop_signal_numbers(names: list[str]) -> list[signal.Signals]:
    """The signals named by the config's `stop_signals` (e.g. SIGTERM, SIGUSR1), with one line for
    a name that is not a signal a process can handle."""
    numbers = []
    for name in names:
        number = getattr(signal.Signals, str(name), None)
        if number is None or number in (signal.SIGKILL, signal.SIGSTOP):
            raise UserError(f"stop_signals: '{name}' is not a signal a process can handle (e.g. SIGTERM, SIGUSR1)")
        numbers.append(number)
    return numbers


def disk_full(path, needed_bytes: int, kept: str = "") -> UserError:
    """The one line for a write that found no space left on its device (ENOSPC), once its partial
    files are removed: the path, about how much it needs, how much is free, and `kept` (what
    remains intact)."""
    folder = Path(path).parent
    while not folder.exists():  # the filesystem that holds it
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    return UserError(
        f"no space left on the device for '{path}': it needs about {_size(needed_bytes)}, {_size(free)} are "
        f"free{'; ' + kept if kept else ''}; free some space, then run the command again (with --resume for a "
        "training run)"
    )


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"


def read_user_text(path, what: str = "file") -> str:
    """The UTF-8 text of a file the user named, with one line when it is missing, unreadable or not UTF-8."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' not found") from None
    except IsADirectoryError:
        raise UserError(f"{what} '{path}' is a folder, not a file") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{what} '{path}' is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"{what} '{path}' cannot be read ({err.strerror})") from None


def read_user_json(path, what: str = "file"):
    """The parsed JSON of a file the user named (`read_user_text`), with one line when it is not JSON."""
    try:
        return json.loads(read_user_text(path, what))
    except json.JSONDecodeError as err:
        raise UserError(f"{what} '{path}' is not valid JSON (line {err.lineno}: {err.msg})") from None


def warn(message: str) -> None:
    """A one-line warning on stderr, in the CLI's format (`ranke: warning: ...`)."""
    print(f"ranke: warning: {message}", file=sys.stderr)


def select_device(name: str = "auto") -> torch.device:
    """Resolve a device name; `auto` means CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available; use device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global generators (recipes also keep explicit generators)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool = True) -> None:
    """Deterministic kernels, used by tests and exact-resume runs on CPU."""
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"precision='{precision}' is not one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str):
    """The context model forward passes run under: bf16 autocast (matrix products in bfloat16,
    weights, optimizer state and reductions in fp32) or nothing for fp32. Recipes compute their
    losses on `.float()` outputs, so log-probs, rewards and decoder pixels stay fp32 either way."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def progress_bars_off() -> bool:
    """RANKE_NO_PROGRESS=1: no live bars (CI logs, tests, worker processes writing to a log file)."""
    return os.environ.get("RANKE_NO_PROGRESS") == "1"


def progress(iterable=None, total: int | None = None, desc: str = "", disable_on_workers: bool = False, **kwargs):
    """A tqdm bar on stderr; silenced when RANKE_NO_PROGRESS=1 (CI logs, tests) and, with
    `disable_on_workers=True`, on processes other than the main one."""
    disable = progress_bars_off() or disable_on_workers
    return tqdm(iterable, total=total, desc=desc, disable=disable, file=sys.stderr, dynamic_ncols=True, **kwargs)


def format_duration(seconds: float) -> str:
    """`42 s`, `3.5 min` or `1.2 h`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def progress_line(desc: str, step: int, total: int, seconds_per_step: float, scores: dict[str, str]) -> str:
    """One plain progress line, for a log file where a live bar cannot go: step out of total,
    seconds per step, the time left at that pace and the latest scores,
    e.g. `posttrain[policy]: step 12/100, 2.41 s/step, ETA 3.5 min, toy_clip 90.12`."""
    eta = format_duration((total - step) * seconds_per_step)
    return f"{desc}: step {step}/{total}, {seconds_per_step:.2f} s/step, ETA {eta}" + "".join(
        f", {name} {value}" for name, value in scores.items()
    )
