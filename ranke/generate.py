"""`ranke sample`: prompts in, a folder of PNGs plus captions.jsonl out (the layout
`ranke toy verify` and `ranke fid` read)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import torch
from PIL import Image

from ranke.backbone import Backbone, load_toy_backbone
from ranke.config import RunConfig
from ranke.runtime import UserError, progress, select_device
from ranke.toy.tools import CAPTIONS_FILE


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt (one per line), .jsonl (`caption` or `prompt` key) or .csv (`caption`/`prompt` column)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file '{path}' not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompts.append(record.get("caption") or record["prompt"])
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise UserError(f"{path}:{number}: expected a JSON object with a 'caption' or 'prompt'") from None
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        column = next((c for c in ("caption", "prompt") if rows and c in rows[0]), None)
        if column is None:
            raise UserError(f"{path}: a CSV prompt file needs a 'caption' or 'prompt' column")
        prompts = [row[column] for row in rows]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise UserError(f"prompt file '{path}' holds no prompts")
    return prompts


def load_backbone(ckpt: str | None, device: torch.device) -> tuple[Backbone, RunConfig]:
    """The backbone of a run directory, checkpoint directory or policy asset file (None: committed toy assets)."""
    if ckpt is None:
        return load_toy_backbone(device=device)
    path = Path(ckpt)
    if path.is_file():
        return load_toy_backbone(policy_path=path, device=device)
    if (path / "toy_policy.safetensors").is_file():
        tokenizer = None
        if (path / "config.yaml").is_file():
            from ranke import config as config_lib

            tokenizer = config_lib.load(RunConfig, str(path / "config.yaml")).sft.tokenizer
        return load_toy_backbone(policy_path=path / "toy_policy.safetensors", tokenizer_path=tokenizer, device=device)
    raise UserError(f"'{ckpt}' is neither a policy file nor a run directory with toy_policy.safetensors")


def sample_prompts_to_dir(
    ckpt: str | None,
    prompts_file: str,
    out_dir: str,
    cfg_scale: float | None = None,
    seed: int = 0,
    n_per_prompt: int = 1,
    batch_size: int = 64,
    device: str = "auto",
) -> dict:
    """Sample `n_per_prompt` images per prompt; images are written as they come (NNNNN.png)."""
    if n_per_prompt < 1 or batch_size < 1:
        raise UserError("--n-per-prompt and --batch-size must be positive")
    prompts = [p for p in read_prompts(prompts_file) for _ in range(n_per_prompt)]
    backbone, cfg = load_backbone(ckpt, select_device(device))
    sampling = cfg.sampling if cfg_scale is None else dataclasses.replace(cfg.sampling, cfg_scale=cfg_scale)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(backbone.device).manual_seed(seed)
    with open(out / CAPTIONS_FILE, "w") as captions, progress(total=len(prompts), desc="sampling") as bar:
        index = 0
        for batch, images in backbone.generate_images(prompts, sampling, generator, batch_size):
            pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
            for prompt, image in zip(batch, pixels):
                name = f"{index:05d}.png"
                Image.fromarray(image).save(out / name)
                captions.write(json.dumps({"file": name, "caption": prompt}) + "\n")
                index += 1
            bar.update(len(batch))
    return {"n": len(prompts), "out": str(out), "cfg_scale": sampling.cfg_scale, "seed": seed}
