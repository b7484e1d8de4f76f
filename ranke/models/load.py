"""Checkpoint I/O shared by every loader: read a state dict safely, compare it with a model.

* `.safetensors` files are read with safetensors; anything else with
  `torch.load(weights_only=True)`, which refuses arbitrary Python objects. A file that needs
  full unpickling is only read when the caller passes `trust_pickle=True`
  (the CLI's `--trust-checkpoint`).
* Training checkpoints are unwrapped: `{"model": sd}`, `{"module": sd}` and
  `{"state_dict": sd}` (looked up in that order) as well as bare state dicts; a `module.`
  (DDP) or `_orig_mod.` (torch.compile) prefix present on every key is stripped.
* Every failure a user can cause is a `UserError` with one line saying what is wrong.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from ranke.runtime import UserError

WRAPPER_KEYS = ("model", "module", "state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

Layout = Mapping[str, Sequence[int]]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _load_pickle(path: Path, trust_pickle: bool) -> object:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing the file
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:  # torch.load raises many unrelated types on bad input
        # torch's weights-only refusal names the global when there is one ("Unsupported global"),
        # otherwise only the pickle operation (e.g. "Unsupported operand 149" for plain pickles)
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if not trust_pickle and (unsupported or "Weights only load failed" in str(err)):
            what = f"a Python object ({unsupported.group(1)})" if unsupported else "pickled Python data"
            raise UserError(
                f"checkpoint '{path}' contains {what} that needs arbitrary unpickling; "
                "pass --trust-checkpoint to allow unpickling if you trust the file"
            ) from None
        raise UserError(f"'{path}' is not a readable PyTorch checkpoint ({_first_line(err)})") from None


def _unwrap(obj: object) -> object:
    """Descend through training-checkpoint wrappers down to the state dict."""
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[key] for key in WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return obj


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = True
    while stripped and state_dict:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
                stripped = True
    return state_dict


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat {name: tensor} dict on the CPU (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint '{path}' not found")
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' is not a file")
    if path.suffix == ".safetensors":
        try:
            obj: object = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"'{path}' is not a readable safetensors file ({_first_line(err)})") from None
    else:
        obj = _load_pickle(path, trust_pickle)

    obj = _unwrap(obj)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, Mapping) else {}
    if not tensors:
        found = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise UserError(f"checkpoint '{path}' holds no tensors (found {found})")
    return _strip_prefixes(tensors)


def layout_of(state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a module's state dict or of a state dict."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    return {key: tuple(value.shape) for key, value in state.items()}


def _shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(n)) for n in shape) + "]"


def _ignored(key: str, ignore: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in ignore)


def compare_state_dict(
    expected: Layout, found: Mapping[str, torch.Tensor], ignore: Sequence[str] = ()
) -> list[str]:
    """One line per mismatch between an expected {key: shape} layout and a state dict.

    Lines: `missing: KEY [shape]`, `wrong shape: KEY expected [..] found [..]` (in the
    expected order), then `unexpected: KEY [shape]`. Keys matching a glob in `ignore`
    (e.g. `*.k_cache`, `freqs_cis`) are skipped on both sides.
    """
    problems = []
    for key, shape in expected.items():
        if _ignored(key, ignore):
            continue
        if key not in found:
            problems.append(f"missing: {key} {_shape(shape)}")
        elif tuple(found[key].shape) != tuple(shape):
            problems.append(f"wrong shape: {key} expected {_shape(shape)} found {_shape(found[key].shape)}")
    for key, value in found.items():
        if key not in expected and not _ignored(key, ignore):
            problems.append(f"unexpected: {key} {_shape(value.shape)}")
    return problems


def check_checkpoint(
    path: str | Path, expected_layout: Layout, trust_pickle: bool = False, ignore: Sequence[str] = ()
) -> tuple[int, list[str]]:
    """Read `path` and compare it with `expected_layout`: (number of tensors, mismatch lines)."""
    state_dict = read_state_dict(path, trust_pickle)
    return len(state_dict), compare_state_dict(expected_layout, state_dict, ignore)


def check_checkpoint_report(
    path: str | Path,
    model_factory_or_layout: Callable[[], nn.Module] | Layout,
    trust_pickle: bool = False,
    ignore: Sequence[str] = (),
) -> tuple[bool, list[str]]:
    """What `ranke check-checkpoint` prints: (True, ["ok N tensors"]) or (False, mismatch lines + summary).

    A model factory is called on the meta device, so even multi-billion-parameter layouts
    cost no memory. Unreadable files raise `UserError`.
    """
    if callable(model_factory_or_layout):
        with torch.device("meta"):
            expected = layout_of(model_factory_or_layout())
    else:
        expected = dict(model_factory_or_layout)
    n_tensors, problems = check_checkpoint(path, expected, trust_pickle, ignore)
    if not problems:
        return True, [f"ok {n_tensors} tensors"]
    return False, [*problems, f"{len(problems)} mismatches ({n_tensors} tensors in the file, {len(expected)} expected)"]


def load_into(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], ignore: Sequence[str] = (), max_listed: int = 5
) -> None:
    """Strictly load `state_dict` into `model` (keys matching `ignore` keep the model's values).

    Raises `UserError` naming the first `max_listed` mismatches when keys or shapes differ.
    Tensors are cast to the model's dtypes by `load_state_dict`.
    """
    problems = compare_state_dict(layout_of(model), state_dict, ignore)
    if problems:
        more = f"; and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
        raise UserError(
            f"checkpoint does not match {type(model).__name__}: " + "; ".join(problems[:max_listed]) + more
        )
    kept = {key: value for key, value in state_dict.items() if not _ignored(key, ignore)}
    model.load_state_dict(kept, strict=False)
