"""Small pretrained toy assets shipped inside the package (safetensors + their model args).

An asset file stores its weights (fp16 by default, to keep the package small) and, in the
safetensors metadata, the asset kind and the dataclass args needed to rebuild the module.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ranke.runtime import UserError

ASSET_DIR = Path(__file__).parent / "assets"
ASSET_FILES = {
    "tokenizer": "toy_tokenizer.safetensors",
    "policy": "toy_policy.safetensors",
    "reward_clip": "toy_clip_reward.safetensors",
    "eval_clip": "toy_clip_eval.safetensors",
    "features": "toy_features.safetensors",
}


def asset_path(name: str) -> Path:
    return ASSET_DIR / ASSET_FILES[name]


def save_asset(path: str | Path, kind: str, args, state_dict: dict, dtype: torch.dtype = torch.float16) -> None:
    """Write `state_dict` (floating tensors cast to `dtype`) with `kind` and `args` in the metadata.

    `args` is a config dataclass or a dict of them (e.g. the policy with its text encoder's config).
    """
    tensors = {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state_dict.items()
    }
    if dataclasses.is_dataclass(args):
        args = dataclasses.asdict(args)
    else:
        args = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in args.items()}
    metadata = {"kind": kind, "args": json.dumps(args)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_asset(path: str | Path, kind: str) -> tuple[dict, dict]:
    """Return (args as a dict, fp32 state dict) of an asset file of the given kind."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"asset '{path}' not found; rebuild it with the command in docs/assets.md")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several unrelated types for a damaged file
        raise UserError(f"asset '{path}' is not a readable safetensors file ({err})") from None
    if metadata.get("kind") != kind:
        raise UserError(f"asset '{path}' holds a '{metadata.get('kind')}', expected a '{kind}'")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    return json.loads(metadata["args"]), state
