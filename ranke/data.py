"""Real data: image-caption pairs for post-training, prompt sets for evaluation.

Post-training needs each prompt's real image (the decoder stage reconstructs it), so a
training source yields (caption, image float [3, S, S] in [0, 1]) pairs, center-cropped and
resized to the model resolution S. Two layouts are read:

* a folder of images with a listing, `captions.jsonl` (`{"file": ..., "caption": ...}` per
  line, what `ranke sample` and `ranke toy sample` write) or `captions.csv` (`file`, `caption`
  columns);
* webdataset-style `.tar` shards (the BLIP3o and HPDv2 subsets of the paper): members that
  share a key (the path up to the first dot of the file name) form one sample, the image in
  `jpg/jpeg/png/webp`, the caption in `txt` or in `json` (`caption`, `prompt` or `text` key).

Shard members are read into memory only and never extracted; a member with an absolute
path, a `..` component, or that is not a regular file (link, device, fifo) is rejected.
Samples without a caption or an image, and images that do not decode, are skipped and
counted in `ImageCaptionSource.stats`.

The toy world needs no files: `ToyPromptSource` draws its seeded training stream, or prompts
from a toy-grammar prompt file with a freshly rendered real image each. Both sources are
`PromptSource`s.

Evaluation needs prompts only: `read_eval_prompts` reads txt/csv/jsonl prompt files and
COCO captions JSON.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import re
import struct
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

from ranke.runtime import UserError, progress, read_user_text
from ranke.toy.data import ToyConfig, render_caption, scene_for_caption, train_batch


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt (one per line), .jsonl (`caption` or `prompt` key) or .csv (`caption`/`prompt` column)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file '{path}' not found")
    text = read_user_text(path, "prompt file")
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

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
CAPTION_KEYS = ("caption", "prompt", "text")  # looked up in this order in json records and csv columns
LISTING_NAMES = ("captions.jsonl", "captions.csv")
# what PIL raises on bytes that are not a decodable image: UnidentifiedImageError and truncated
# data are OSErrors; some format plugins raise the others on malformed headers
DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, struct.error, Image.DecompressionBombError)
STAT_KEYS = ("samples", "no_caption", "no_image", "unreadable_images", "rejected_members", "unreadable_shards")


@dataclass(frozen=True)
class Record:
    """One indexed sample: its caption and where its image bytes are."""

    caption: str
    path: Path  # the image file, or the tar shard that holds it
    name: str  # shown in messages: the file name, or `shard.tar:member`
    offset: int = 0  # first byte of the image inside `path`
    size: int = -1  # number of bytes; -1 reads to the end of the file

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            return file.read(self.size)


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The central square of `image` (side: its shorter side), resized to `size` x `size`
    with PIL bicubic (the paper crops and resizes real images to the model resolution)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), Image.Resampling.BICUBIC)


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """Encoded image bytes -> float32 [3, size, size] in [0, 1]; raises one of DECODE_ERRORS.

    EXIF orientation is applied first, so camera photos stored sideways are not cropped
    along the wrong side.
    """
    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    pixels = np.array(center_crop_resize(image, size), dtype=np.uint8)
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)


def caption_of(record: dict) -> str | None:
    """The first non-empty string among a record's CAPTION_KEYS, stripped; None if none."""
    for key in CAPTION_KEYS:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def new_stats() -> dict[str, int]:
    return dict.fromkeys(STAT_KEYS, 0)


def skipped_summary(stats: dict[str, int]) -> str:
    """'2 no caption, 1 rejected members' for the non-zero skip counts of `stats`."""
    return ", ".join(f"{count} {key.replace('_', ' ')}" for key, count in stats.items() if key != "samples" and count)


# ---------------------------------------------------------------------------------------------
# folder of images + captions.jsonl / captions.csv


def read_listing(listing: Path) -> list[tuple[str, str | None]]:
    """(file, caption or None) per entry of a captions .jsonl or .csv file."""
    text = read_user_text(listing, "captions file")
    if listing.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        columns = reader.fieldnames or []
        if "file" not in columns or not any(key in columns for key in CAPTION_KEYS):
            raise UserError(f"{listing}: a captions CSV needs a 'file' and a 'caption' column")
        return [(row["file"], caption_of(row)) for row in reader]
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            entries.append((str(record["file"]), caption_of(record)))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f'{listing}:{number}: expected a JSON object with a "file" and a "caption"') from None
    return entries


def index_folder(listing: Path) -> tuple[list[Record], dict[str, int]]:
    """Records of the images a listing names (paths relative to the listing's folder)."""
    records, stats = [], new_stats()
    for file, caption in read_listing(listing):
        path = listing.parent / file
        if not path.is_file():
            stats["no_image"] += 1
        elif caption is None:
            stats["no_caption"] += 1
        else:
            records.append(Record(caption, path, name=file))
    stats["samples"] = len(records)
    return records, stats


# ---------------------------------------------------------------------------------------------
# webdataset-style tar shards

BRACE = re.compile(r"\{([^{}]*)\}")
NUMERIC_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def expand_braces(pattern: str) -> list[str]:
    """Expand `{000..009}` (zero-padded to the width of the first number) and `{a,b}` groups,
    left to right: `data-{0..1}-{a,b}.tar` -> data-0-a.tar, data-0-b.tar, data-1-a.tar, ..."""
    match = BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numbers = NUMERIC_RANGE.fullmatch(body)
    if numbers:
        first, last = numbers.groups()
        if int(last) < int(first):
            raise UserError(f"brace range '{{{body}}}' in '{pattern}' runs backwards")
        items = [f"{value:0{len(first)}d}" for value in range(int(first), int(last) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise UserError(f"'{{{body}}}' in '{pattern}' is neither a range like {{000..009}} nor a list like {{a,b}}")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for item in items for expanded in expand_braces(head + item + tail)]


def resolve_shards(spec: str) -> list[Path]:
    """Shard paths of a directory (its *.tar, sorted), a glob, a brace range, or one file."""
    if Path(spec).is_dir():
        shards = sorted(Path(spec).glob("*.tar"))
    else:
        shards = []
        for pattern in expand_braces(spec):
            if any(char in pattern for char in "*?["):
                shards.extend(sorted(Path(path) for path in glob.glob(pattern)))
            elif Path(pattern).is_file():
                shards.append(Path(pattern))
            else:
                raise UserError(f"data source '{pattern}' not found")
    if not shards:
        raise UserError(
            f"no .tar shards in '{spec}'; give a folder with captions.jsonl/.csv, a folder of .tar "
            f"shards, a glob or a brace range like data-{{000..009}}.tar"
        )
    return shards


def is_safe_member(member: tarfile.TarInfo) -> bool:
    """A regular file whose path stays inside the archive (not absolute, no `..` component)."""
    path = PurePosixPath(member.name)
    return member.isfile() and not path.is_absolute() and ".." not in path.parts


def split_key(name: str) -> tuple[str, str]:
    """Sample key and extension of a member, webdataset's way: `dir/000123.seg.png` ->
    (`dir/000123`, `seg.png`); the key keeps the directory, the extension is lower case."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return f"{directory}/{stem}" if directory else stem, extension.lower()


def shard_caption(tar: tarfile.TarFile, parts: dict[str, tarfile.TarInfo]) -> str | None:
    """A sample's caption from its `txt` member, else from its `json` member; None if neither has one."""
    try:
        if "txt" in parts:
            return tar.extractfile(parts["txt"]).read().decode("utf-8").strip() or None
        if "json" in parts:
            record = json.loads(tar.extractfile(parts["json"]).read())
            return caption_of(record) if isinstance(record, dict) else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return None


def index_shard(shard: Path, stats: dict[str, int]) -> list[Record]:
    """Records of one shard. Captions are read now (they are small), images later by offset."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    records = []
    with tarfile.open(shard, mode="r:") as tar:
        for member in tar:
            if member.isdir():
                continue
            if not is_safe_member(member):
                stats["rejected_members"] += 1
                continue
            key, extension = split_key(member.name)
            samples.setdefault(key, {})[extension] = member
        for parts in samples.values():
            image = next((parts[extension] for extension in IMAGE_EXTENSIONS if extension in parts), None)
            caption = shard_caption(tar, parts)
            if image is None:
                if caption is not None:  # keys with neither (other extensions only) are no samples at all
                    stats["no_image"] += 1
            elif caption is None:
                stats["no_caption"] += 1
            else:
                records.append(Record(caption, shard, f"{shard.name}:{image.name}", image.offset_data, image.size))
    return records


def index_shards(shards: list[Path]) -> tuple[list[Record], dict[str, int]]:
    """Records of every shard in order; a shard that is not a readable (uncompressed) tar is
    skipped and counted."""
    records, stats = [], new_stats()
    for shard in progress(shards, desc="indexing shards", unit="shard"):
        try:
            records.extend(index_shard(shard, stats))
        except (tarfile.TarError, OSError) as err:
            stats["unreadable_shards"] += 1
            warnings.warn(f"shard '{shard}' skipped: {err}", stacklevel=2)
    stats["samples"] = len(records)
    return records, stats


def index_source(source: str) -> tuple[list[Record], dict[str, int]]:
    """Index a training source: a captions .jsonl/.csv file, a folder holding one, or tar shards."""
    path = Path(source)
    if path.is_file() and path.suffix in (".jsonl", ".csv"):
        return index_folder(path)
    listing = next((path / name for name in LISTING_NAMES if (path / name).is_file()), None)
    if path.is_dir() and listing is not None:
        return index_folder(listing)
    return index_shards(resolve_shards(source))


# ---------------------------------------------------------------------------------------------
# seeded batches for the post-training loop


class PromptSource(Protocol):
    """B (prompt, real image) pairs per step, resumable from the loop's generator plus its own state."""

    def next_batch(self, batch_size: int) -> tuple[list[str], torch.Tensor]:
        """(prompts, real images float [B, 3, H, W] in [0, 1])."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ToyPromptSource:
    """The toy world's pairs: the seeded toy training stream, or toy-grammar `prompts` (read from a
    prompt file, or given as a list from Python) with a freshly rendered real image for each;
    `origin` names where they came from in messages. Its only state is the loop's generator."""

    def __init__(self, toy: ToyConfig, prompts: list[str] | None, rng: np.random.Generator, origin: str = "prompts"):
        self.toy, self.rng, self.prompts = toy, rng, prompts
        for prompt in prompts or ():  # a scene for each prompt, so a bad one fails now, not mid-run
            try:
                scene_for_caption(prompt, np.random.default_rng(0))
            except ValueError as err:
                raise UserError(f"{origin}: {err}") from None

    def next_batch(self, batch_size: int) -> tuple[list[str], torch.Tensor]:
        if self.prompts is None:
            images, captions, _ = train_batch(self.rng, batch_size, self.toy)
            return captions, images
        picked = [self.prompts[i] for i in self.rng.integers(len(self.prompts), size=batch_size)]
        pixels = np.stack([render_caption(prompt, self.rng, self.toy) for prompt in picked])
        return picked, torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass



class ImageCaptionSource:
    """B (caption, real image) pairs per step, in a seeded shuffled order, epoch after epoch.

    Each epoch visits every sample once in the order `default_rng(epoch_seed).permutation(N)`;
    `epoch_seed` is drawn from `rng` (the loop's generator) when the epoch starts, so the
    stream is reproducible from `rng`, and a resume is exact from `rng`'s saved state plus
    `state_dict()` (epoch, position, epoch_seed). Images are read and decoded when a batch
    needs them; an unreadable image is skipped (the batch takes the next sample), counted in
    `stats["unreadable_images"]` and not tried again in later epochs.
    """

    def __init__(self, source: str, image_size: int, rng: np.random.Generator):
        if image_size < 1:
            raise UserError(f"image size must be positive, got {image_size}")
        self.source, self.image_size, self.rng = source, image_size, rng
        self.records, self.stats = index_source(source)
        skipped = skipped_summary(self.stats)
        if not self.records:
            raise UserError(f"no usable image-caption samples in '{source}' ({skipped or 'empty'})")
        if skipped:
            warnings.warn(f"'{source}': {len(self.records)} samples; skipped {skipped}", stacklevel=2)
        self.unreadable: set[int] = set()
        self.epoch, self.position, self.epoch_seed = 0, 0, 0
        self.order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.records)

    def _start_epoch(self, epoch: int, epoch_seed: int) -> None:
        self.epoch, self.epoch_seed = epoch, epoch_seed
        self.order = np.random.default_rng(epoch_seed).permutation(len(self.records))

    def _next_index(self) -> int:
        if self.order is None or self.position == len(self.records):
            self._start_epoch(self.epoch + 1, int(self.rng.integers(2**63)))
            self.position = 0
        index = int(self.order[self.position])
        self.position += 1
        return index

    def _load(self, index: int) -> torch.Tensor | None:
        """The decoded image of record `index`, or None when it does not decode."""
        if index in self.unreadable:
            return None
        record = self.records[index]
        try:
            return decode_image(record.read_bytes(), self.image_size)
        except DECODE_ERRORS as err:
            if not self.unreadable:
                warnings.warn(
                    f"image '{record.name}' skipped, it does not decode ({err}); "
                    f"further ones are counted in stats['unreadable_images']",
                    stacklevel=3,
                )
            self.unreadable.add(index)
            self.stats["unreadable_images"] += 1
            if len(self.unreadable) == len(self.records):
                raise UserError(f"no image in '{self.source}' decodes ({skipped_summary(self.stats)})") from None
            return None

    def next_batch(self, batch_size: int) -> tuple[list[str], torch.Tensor]:
        """(captions, real images float32 [B, 3, S, S] in [0, 1]); batches run across epochs."""
        captions, images = [], []
        while len(images) < batch_size:
            index = self._next_index()
            image = self._load(index)
            if image is not None:
                captions.append(self.records[index].caption)
                images.append(image)
        return captions, torch.stack(images)

    def state_dict(self) -> dict[str, int]:
        """Where the stream is (plain ints); restore `rng`'s state alongside it."""
        return {"epoch": self.epoch, "position": self.position, "epoch_seed": self.epoch_seed, "samples": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["samples"] != len(self):
            raise UserError(
                f"'{self.source}' now has {len(self)} usable samples but the checkpoint was made with "
                f"{state['samples']}; resume with the same data"
            )
        if state["epoch"] == 0:
            self.epoch, self.epoch_seed, self.order = 0, 0, None
        else:
            self._start_epoch(state["epoch"], state["epoch_seed"])
        self.position = state["position"]


# ---------------------------------------------------------------------------------------------
# prompt sets for evaluation


def first_n(prompts: list[str], n: int | None, path: Path) -> list[str]:
    if n is None:
        return prompts
    if n < 1 or n > len(prompts):
        raise UserError(f"'{path}' holds {len(prompts)} prompts; n must be between 1 and {len(prompts)}, got {n}")
    return prompts[:n]


def read_coco_captions(path: str | Path, n: int | None = None, one_per_image: bool = True, seed: int = 0) -> list[str]:
    """Captions of a COCO captions file (`{"annotations": [{"image_id", "caption"}, ...]}`).

    With `one_per_image`, one caption per image, chosen at random (seeded); images in the order
    they first appear. Then a seeded shuffle and the first `n` (all when None), so the same
    seed gives the same set, and a smaller `n` a prefix of a larger one (COCO-30K: n=30000
    from captions_val2014.json). Whitespace inside captions is collapsed (COCO's have stray
    newlines and double spaces).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"captions file '{path}' not found")
    try:
        data = json.loads(read_user_text(path, "captions file"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise UserError(
            f'{path}: expected COCO captions, {{"annotations": [{{"image_id": ..., "caption": ...}}, ...]}}'
        )
    by_image: dict[object, list[str]] = {}
    for number, annotation in enumerate(annotations):
        try:
            caption = " ".join(annotation["caption"].split())
            image_id = annotation["image_id"]
        except (KeyError, TypeError, AttributeError):
            raise UserError(f"{path}: annotation {number} needs an 'image_id' and a 'caption' string") from None
        if caption:
            by_image.setdefault(image_id, []).append(caption)
    rng = np.random.default_rng(seed)
    if one_per_image:
        captions = [group[rng.integers(len(group))] for group in by_image.values()]
    else:
        captions = [caption for group in by_image.values() for caption in group]
    if not captions:
        raise UserError(f"captions file '{path}' holds no captions")
    return first_n([captions[i] for i in rng.permutation(len(captions))], n, path)


def read_eval_prompts(path: str | Path, n: int | None = None, one_per_image: bool = True, seed: int = 0) -> list[str]:
    """Evaluation prompts: COCO captions (.json, see `read_coco_captions`) or a prompt file
    (.txt/.csv/.jsonl, `read_prompts`; the first `n` in file order, no shuffle)."""
    if Path(path).suffix == ".json":
        return read_coco_captions(path, n, one_per_image, seed)
    return first_n(read_prompts(path), n, Path(path))
