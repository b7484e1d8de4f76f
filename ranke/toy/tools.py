"""User-facing toy-world tools: write a folder of samples, verify a folder of images.

A sample folder holds `NNNNN.png` images and `captions.jsonl` with one
`{"file": "00000.png", "caption": "..."}` line per image; `ranke toy sample` writes one and
`ranke toy verify` scores any folder in that layout (for example a model's generations).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ranke.runlock import prepare_output_dir
from ranke.runtime import UserError, progress, read_user_text
from ranke.toy.captions import parse_caption
from ranke.toy.data import ToyConfig, heldout_prompts, render_caption, sample_training_pair
from ranke.toy.render import render_scene
from ranke.toy.verifier import score_image, summarize

CAPTIONS_FILE = "captions.jsonl"


def write_samples(n: int, out_dir, split: str = "train", seed: int = 0, cfg: ToyConfig = ToyConfig()) -> Path:
    """Render `n` captioned images into `out_dir` (created if needed) and return its path.

    split "train" draws scenes and phrasings from the training stream seeded with `seed`;
    "heldout" takes the first `n` held-out prompts, and `seed` only picks their renderings.
    """
    if split not in ("train", "heldout"):
        raise UserError(f"unknown split '{split}': use train or heldout")
    if n < 1:
        raise UserError(f"number of samples must be positive, got {n}")
    rng = np.random.default_rng(seed)
    if split == "heldout":
        prompts = heldout_prompts(cfg)
        if n > len(prompts):
            raise UserError(
                f"the held-out split has {len(prompts)} prompts, asked for {n}: lower n or raise heldout_size"
            )
        captions = prompts[:n]
    out = prepare_output_dir(out_dir)
    with open(out / CAPTIONS_FILE, "w") as lines:
        for index in progress(range(n), desc=f"toy {split} samples"):
            if split == "heldout":
                caption = captions[index]
                image = render_caption(caption, rng, cfg)
            else:
                scene, caption = sample_training_pair(rng)
                image = render_scene(scene, cfg.image_size, cfg.supersample)
            name = f"{index:05d}.png"
            Image.fromarray(image).save(out / name)
            lines.write(json.dumps({"file": name, "caption": caption}) + "\n")
    return out


def _read_entries(folder: Path) -> list[tuple[str, str]]:
    listing = folder / CAPTIONS_FILE
    if not folder.is_dir():
        raise UserError(f"folder '{folder}' not found")
    if not listing.is_file():
        raise UserError(f"'{listing}' not found: a sample folder needs a {CAPTIONS_FILE} with one "
                        '{"file": ..., "caption": ...} line per image')
    entries = []
    for number, line in enumerate(read_user_text(listing, 'caption list').splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            entries.append((str(record["file"]), str(record["caption"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{listing}:{number}: expected a JSON object with \"file\" and \"caption\"") from None
    if not entries:
        raise UserError(f"'{listing}' lists no images")
    return entries


def _load_image(path: Path, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3]; other sizes are resized (area average when shrinking)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (size, size):
                shrinking = image.width > size or image.height > size
                image = image.resize((size, size), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)
            return np.asarray(image)
    except FileNotFoundError:
        raise UserError(f"image '{path}' listed in {CAPTIONS_FILE} not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"image '{path}' cannot be read: {err}") from None


def verify_dir(folder, cfg: ToyConfig = ToyConfig()) -> dict:
    """Score every image listed in `folder/captions.jsonl` against its caption.

    Returns {"n", "accuracy", "object_accuracy", "by_num_objects": {"1": acc, ...}} (whole-prompt
    accuracy overall and per number of caption objects, and the fraction of caption objects found).
    """
    folder = Path(folder)
    entries = _read_entries(folder)
    specs = []
    for name, caption in entries:
        try:
            specs.append(parse_caption(caption))
        except ValueError as err:
            raise UserError(f"{folder / CAPTIONS_FILE}: {name}: {err}") from None
    results = [
        score_image(_load_image(folder / name, cfg.image_size), spec)
        for (name, _), spec in progress(list(zip(entries, specs)), desc="verifying")
    ]
    return summarize(results)
