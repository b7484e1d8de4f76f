"""`ranke eval --protocol geneval`: GenEval (djghosh13/geneval) for real models.

Two parts, which share nothing but the folder:

1. Sampling into the benchmark's layout. Every line of the user's `evaluation_metadata.jsonl`
   (553 prompts, tags single_object, two_object, counting, colors, position, color_attr) gets
   a folder `OUT/NNNNN/` (the line's index, 5 digits) holding `metadata.jsonl` (that line, one
   JSON object), `samples/SSSS.png` (`--n-per-prompt` images, default 4) and `grid.png`.
   Seeds: the prompt list repeated `n` times in place (image k is sample k % n of prompt
   k // n) is cut into batches of `--batch-size` and batch b draws from `batch_seed(seed, b)`,
   as `ranke sample` does (default seed 42): the same seed and batch size give the same images
   whatever the number of processes and however often the run was interrupted and resumed.
2. A scorer: the benchmark's rules (`Rules`, `keep_detections`, `relative_position`, `judge`,
   `summarize`; pure functions of detections) applied to a Mask2Former instance-segmentation
   checkpoint loaded through transformers and a CLIP (`ranke.eval.geneval_models`). The
   official evaluator runs mmdetection's Mask2Former; ours has other weights and
   preprocessing, so its numbers compare our runs with each other and are not published GenEval
   figures: for those, run the official `evaluation/evaluate_images.py` on the same folder.

The rules, as the official evaluator applies them to each image:
* detections of a class are kept, best first, when their score exceeds 0.3 (0.9 for every class
  on a `counting` prompt), at most 16 per class; a lower-scored box whose IoU with a kept box of
  its class reaches `max_overlap` is dropped (1.0, the benchmark's default, drops none);
* each `include` clause {class, count[, color][, position]} takes the `count` best detections
  of its class; fewer is wrong. With `color`, CLIP classifies each of them into the ten colours
  (the object composited onto grey #999 by its mask, cropped to its box) and at least `count`
  must get the asked colour. With `position` [relation, j], each of them must stand in that
  relation to every object clause j matched (`relative_position`); clause j unmatched is wrong;
* each `exclude` clause {class, count} is violated by `count` or more detections of the class;
* an image is correct when no clause fails; the per-tag score is the fraction of correct images
  of the tag, and the overall score the unweighted mean of the per-tag scores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ranke.eval.geneval_models import COLORS, ColorClassifier, Detection, Mask2FormerDetector, detector_classes
from ranke.sample_folder import ModelChoice, load_backbone, model_source, sample_into_dir
from ranke.images import save_image_grid
from ranke.runtime import UserError, progress, read_user_text, select_device

METADATA_FILE = "metadata.jsonl"
SAMPLES_DIR = "samples"
GRID_FILE = "grid.png"
# Our scorer's output folder inside the sample folder; the official evaluator reads only the
# numbered prompt folders, so it ignores it.
SCORES_DIR = "scores_hf_mask2former"
RELATIONS = ("left of", "right of", "above", "below")
OFFICIAL_COMMAND = (
    'python evaluation/evaluate_images.py "{folder}" --outfile "{folder}/results.jsonl" '
    '--model-path "<DETECTOR_FOLDER>" && python evaluation/summary_scores.py "{folder}/results.jsonl"'
)


# --- metadata and layout -----------------------------------------------------------------------


def _clause_error(clause, position_allowed: bool) -> str | None:
    if not isinstance(clause, dict) or not isinstance(clause.get("class"), str):
        return "each clause needs a 'class' name"
    if not isinstance(clause.get("count"), int) or clause["count"] < 1:
        return "each clause needs a positive integer 'count'"
    if "color" in clause and not isinstance(clause["color"], str):
        return "'color' must be a colour name"
    if "position" in clause:
        relation = clause["position"]
        if not position_allowed or not (isinstance(relation, list) and len(relation) == 2
                                        and relation[0] in RELATIONS and isinstance(relation[1], int)):  # fmt: skip
            return f"'position' must be [relation, index of an earlier include clause], relation one of {RELATIONS}"
    return None


def read_metadata(path: str | Path) -> list[dict]:
    """The records of a GenEval `evaluation_metadata.jsonl`: one JSON object per line with `tag`,
    `prompt`, `include` (and optionally `exclude`) clauses; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GenEval metadata file '{path}' not found (the benchmark's prompts/evaluation_metadata.jsonl)")
    records = []
    for number, line in enumerate(read_user_text(path, "GenEval metadata file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number}: not a JSON object") from None
        problem = None
        if not isinstance(record, dict) or not all(isinstance(record.get(key), str) for key in ("prompt", "tag")):
            problem = "expected a JSON object with 'tag', 'prompt' and 'include'"
        elif not isinstance(record.get("include"), list) or not record["include"]:
            problem = "'include' must be a non-empty list of clauses"
        else:
            includes = record["include"]
            problem = next(filter(None, (_clause_error(c, True) for c in includes)), None) or next(
                filter(None, (_clause_error(c, False) for c in record.get("exclude", []))), None
            )
            if problem is None and any(c["position"][1] >= i for i, c in enumerate(includes) if "position" in c):
                problem = "a 'position' clause must refer to an earlier include clause"
        if problem:
            raise UserError(f"{path}:{number}: {problem}")
        records.append(record)
    if not records:
        raise UserError(f"GenEval metadata file '{path}' holds no prompts")
    return records


def prompt_folder(index: int) -> str:
    return f"{index:05d}"


def prompt_folders(folder: Path) -> list[Path]:
    """The numbered prompt folders of a GenEval folder, in order, as the official evaluator finds them."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def sample_path(index: int, sample: int) -> str:
    """Path of sample `sample` of prompt `index`, relative to the output folder."""
    return f"{prompt_folder(index)}/{SAMPLES_DIR}/{sample:04d}.png"


def write_prompt_metadata(out: Path, records: list[dict], write: bool, overwrite: bool = False) -> None:
    """Check `OUT/NNNNN/metadata.jsonl` against the records; with `write`, create the missing ones
    (and with `overwrite` replace those of other prompts).

    A folder sampled from another metadata file is refused rather than mixed (resuming must see
    the same prompts). Files are written under a temporary name and renamed, so another process
    never reads half of one.
    """
    for index, record in enumerate(records):
        path = out / prompt_folder(index) / METADATA_FILE
        if path.is_file():
            try:
                existing = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                existing = None
            if existing == record:
                continue
            if not overwrite:
                raise UserError(
                    f"'{path}' holds another prompt than line {index + 1} of the metadata file: "
                    f"this folder was sampled from other metadata; choose a new --out or pass --overwrite"
                )
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(path.name + ".tmp")
            temporary.write_text(json.dumps(record) + "\n", encoding="utf-8")
            os.replace(temporary, path)


def write_grids(out: Path, n_prompts: int, n_per_prompt: int) -> None:
    """`grid.png` of each prompt folder: its samples side by side (rewritten, so it always shows
    the samples there are)."""
    for index in range(n_prompts):
        images = [np.asarray(Image.open(out / sample_path(index, s)).convert("RGB")) for s in range(n_per_prompt)]
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
        save_image_grid(pixels, out / prompt_folder(index) / GRID_FILE, nrow=n_per_prompt)


def sample_geneval(
    *,
    metadata: str | Path,
    out_dir: str | Path,
    model: ModelChoice = ModelChoice(),
    n_per_prompt: int = 4,
    seed: int = 42,
    batch_size: int = 64,
    overwrite: bool = False,
) -> dict:
    """Sample every prompt of a GenEval metadata file into the benchmark's layout (module docstring)
    with the chosen `model` (`ranke.sample_folder.load_backbone`). Resumable (finished batches are
    skipped; a complete folder loads no model) and split across processes under `torchrun` /
    `accelerate launch` (`ranke.sample_folder.sample_into_dir`).
    """
    from accelerate import PartialState

    if n_per_prompt < 1 or batch_size < 1:
        raise UserError("--n-per-prompt and --batch-size must be positive")
    records = read_metadata(metadata)
    out = Path(out_dir)
    # cpu=...: a PartialState first made without it stays one process on a CPU-only machine
    state = PartialState(cpu=select_device(model.requested_device()).type == "cpu")
    names = [sample_path(i, s) for i in range(len(records)) for s in range(n_per_prompt)]
    prompts = [record["prompt"] for record in records for _ in range(n_per_prompt)]
    summary = {"n_prompts": len(records), "n_per_prompt": n_per_prompt, "n": len(names), "seed": seed,
               "out": str(out), "ckpt": model.checkpoint, "policy": model.policy, "decoder": model.decoder}  # fmt: skip
    model = model.resolved()
    backbone, cfg = load_backbone(model)  # also for a complete folder: its provenance is checked
    summary["cfg_scale"] = cfg.sampling.cfg_scale
    summary["processes"] = sample_into_dir(
        backbone, cfg.sampling, prompts, out, seed=seed, batch_size=batch_size, names=names,
        source=model_source(model, cfg), overwrite=overwrite,
    )  # fmt: skip
    if overwrite and state.is_main_process:  # prompt folders beyond the new metadata would be evaluated too
        for folder in prompt_folders(out):
            if int(folder.name) >= len(records):
                shutil.rmtree(folder)
    write_prompt_metadata(out, records, state.is_main_process, overwrite)  # after sample_into_dir's provenance check
    if state.is_main_process:
        write_grids(out, len(records), n_per_prompt)
    return summary


# --- the rules ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rules:
    """The benchmark's thresholds (the official evaluator's defaults)."""

    threshold: float = 0.3  # detection score a kept detection must exceed
    counting_threshold: float = 0.9  # the same on `counting` prompts
    max_objects: int = 16  # kept detections per class
    max_overlap: float = 1.0  # IoU at which a lower-scored box of the same class is dropped; 1.0 drops none
    position_margin: float = 0.1  # fraction of the two boxes' summed sizes an offset must exceed


def box_iou(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes with the evaluator's inclusive pixel convention (a box
    from 0 to 9 is 10 pixels wide); 0 when the union is empty."""

    def area(x1, y1, x2, y2):
        return max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def keep_detections(
    detections: dict[str, list[Detection]], tag: str, rules: Rules = Rules()
) -> dict[str, list[Detection]]:
    """The detections the rules look at, per class, best first (classes left empty are dropped)."""
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    kept = {}
    for name, candidates in detections.items():
        ordered = sorted((d for d in candidates if d.score > threshold), key=lambda d: -d.score)[: rules.max_objects]
        chosen: list[Detection] = []
        for candidate in ordered:
            if rules.max_overlap >= 1 or all(box_iou(candidate.box, c.box) < rules.max_overlap for c in chosen):
                chosen.append(candidate)
        if chosen:
            kept[name] = chosen
    return kept


def relative_position(a: Detection, b: Detection, margin: float = Rules.position_margin) -> set[str]:
    """Relations of `a` to `b` ("left of", "right of", "above", "below"; image y points down).

    The offset between box centres is shrunk on each axis by `margin` times the two boxes'
    summed sizes along it (clamped at 0); what remains, over the length of the unshrunk offset,
    must exceed 0.5 on an axis for its relation. Offsets within the margin on both axes give no
    relation; a shrunk offset exactly at 0.5 gives none either.
    """
    box_a, box_b = np.asarray(a.box[:4], dtype=np.float64), np.asarray(b.box[:4], dtype=np.float64)
    offset = (box_a[:2] + box_a[2:]) / 2 - (box_b[:2] + box_b[2:]) / 2
    sizes = np.abs(box_a[2:] - box_a[:2]) + np.abs(box_b[2:] - box_b[:2])
    shrunk = np.maximum(np.abs(offset) - margin * sizes, 0.0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    found = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {relation for relation, holds in found.items() if holds}


def judge(
    metadata: dict, detections: dict[str, list[Detection]], colors_of, rules: Rules = Rules()
) -> tuple[bool, str]:
    """Whether an image's kept detections (`keep_detections`) satisfy a metadata record, and why
    not (one line per failed clause, the official evaluator's wording).

    `colors_of(class_name, detections) -> [colour name per detection]` classifies colours; it is
    called only for the detections a colour clause checks.
    """
    reasons = []
    matched: list[list[Detection] | None] = []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = detections.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and "color" in clause:
            colors = colors_of(name, found)
            if colors.count(clause["color"]) < count:
                ok = False
                tally = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                reasons.append(f"expected {clause['color']} {name}>={count}, found {colors.count(clause['color'])} "
                               f"{clause['color']}; and {tally}")  # fmt: skip
        if ok and "position" in clause:
            relation, target = clause["position"]
            if matched[target] is None:
                ok = False
                reasons.append(f"no target for {name} to be {relation}")
            else:
                for obj in found:
                    relations = [relative_position(obj, t, rules.position_margin) for t in matched[target]]
                    wrong = next((r for r in relations if relation not in r), None)
                    if wrong is not None:
                        ok = False
                        reasons.append(f"expected {name} {relation} target, found {' and '.join(sorted(wrong))} target")
                        break
        matched.append(found if ok else None)
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], clause["count"]
        if len(detections.get(name, [])) >= count:
            reasons.append(f"expected {name}<{count}, found {len(detections[name])}")
    return not reasons, "\n".join(reasons)


def summarize(results: list[dict]) -> dict:
    """Per-tag and overall scores of results.jsonl records (ours or the official evaluator's).

    `accuracy`: fraction of correct images (the toy verifier's key); `prompt_accuracy`: fraction
    of prompts (distinct `metadata`) with at least one correct image; `by_tag`: fraction of
    correct images per tag, in the order tags first appear; `overall`: the unweighted mean of
    `by_tag`, the GenEval score.
    """
    if not results:
        raise UserError("no results to summarise")
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[str, bool] = {}
    for record in results:
        by_tag.setdefault(record["tag"], []).append(bool(record["correct"]))
        by_prompt[record["metadata"]] = by_prompt.get(record["metadata"], False) or bool(record["correct"])
    scores = {tag: sum(values) / len(values) for tag, values in by_tag.items()}
    return {
        "n": len(results),
        "n_prompts": len(by_prompt),
        "accuracy": sum(bool(r["correct"]) for r in results) / len(results),
        "prompt_accuracy": sum(by_prompt.values()) / len(by_prompt),
        "by_tag": scores,
        "n_by_tag": {tag: len(values) for tag, values in by_tag.items()},
        "overall": sum(scores.values()) / len(scores),
    }


# --- scoring a folder ---------------------------------------------------------------------------


def folder_images(folder: Path) -> list[tuple[Path, dict]]:
    """(image path, metadata record) of every sample of a GenEval folder, as the official
    evaluator finds them: numbered subfolders with metadata.jsonl, samples/<digits>.png."""
    found = []
    for sub in prompt_folders(folder):
        if not (sub / METADATA_FILE).is_file():
            raise UserError(f"'{sub}' has no {METADATA_FILE}: not a GenEval prompt folder")
        record = json.loads((sub / METADATA_FILE).read_text(encoding="utf-8"))
        images = sorted(p for p in (sub / SAMPLES_DIR).glob("*.png") if re.fullmatch(r"\d+\.png", p.name))
        found += [(image, record) for image in images]
    if not found:
        raise UserError(f"'{folder}' holds no GenEval samples (NNNNN/samples/NNNN.png)")
    return found


def check_detector_classes(records: list[dict], detector_path: str) -> None:
    """One clear error when the metadata names a class the detector does not know."""
    classes = detector_classes(detector_path)
    unknown = sorted({c["class"] for r in records for c in r["include"] + r.get("exclude", [])} - set(classes))
    if unknown:
        raise UserError(f"detector '{detector_path}' has no class {', '.join(repr(u) for u in unknown)} "
                        f"(its classes: {', '.join(classes)})")  # fmt: skip


def score_image(image: Image.Image, record: dict, detector, colors, rules: Rules = Rules()) -> tuple[bool, str, dict]:
    """(correct, reason, kept detections) of one image under the rules."""
    kept = keep_detections(detector(image), record["tag"], rules)
    correct, reason = judge(record, kept, lambda name, found: colors(image, name, found), rules)
    return correct, reason, kept


def score_geneval_folder(
    folder: str | Path, detector_path: str, clip_path: str, rules: Rules = Rules(), device: str = "auto"
) -> dict:
    """Score a GenEval folder with our detector and CLIP: `FOLDER/scores_hf_mask2former/` gets
    results.jsonl (one line per image with the official evaluator's keys) and summary.json."""
    folder = Path(folder)
    images = folder_images(folder)
    check_detector_classes([record for _, record in images], detector_path)
    torch_device = select_device(device)
    detector = Mask2FormerDetector(detector_path, torch_device)
    colors = ColorClassifier(clip_path, torch_device)
    results = []
    for path, record in progress(images, desc="GenEval scoring"):
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        correct, reason, kept = score_image(image, record, detector, colors, rules)
        details = {name: [[*d.box, d.score] for d in found] for name, found in kept.items()}
        results.append({"filename": str(path), "tag": record["tag"], "prompt": record["prompt"], "correct": correct,
                        "reason": reason, "metadata": json.dumps(record), "details": json.dumps(details)})  # fmt: skip
    summary = {
        "scorer": "GenEval rules on a transformers Mask2Former and CLIP (not the official mmdetection detector)",
        "detector": str(detector_path),
        "clip": str(clip_path),
        "rules": dataclasses.asdict(rules),
        **summarize(results),
    }
    out = folder / SCORES_DIR
    out.mkdir(exist_ok=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate_geneval(
    *,
    metadata: str,
    out_dir: str,
    model: ModelChoice = ModelChoice(),
    detector_path: str | None = None,
    clip_path: str | None = None,
    **sample_options,
) -> dict:
    """`ranke eval --protocol geneval`: sample (`sample_geneval`, which takes the `sample_options`
    keywords), then, given a detector and a CLIP, score (`score_geneval_folder`); the result
    names the official command for the folder."""
    from accelerate import PartialState

    if (detector_path is None) != (clip_path is None):
        raise UserError(
            "scoring GenEval needs both --detector (a local Mask2Former directory) and --clip-path (CLIP ViT-L/14)"
        )
    if detector_path is not None:
        check_detector_classes(read_metadata(metadata), detector_path)  # before hours of sampling
    result = sample_geneval(metadata=metadata, out_dir=out_dir, model=model, **sample_options)
    result["official_command"] = OFFICIAL_COMMAND.format(folder=out_dir)
    if detector_path is not None and PartialState().is_main_process:
        summary = score_geneval_folder(out_dir, detector_path, clip_path, device=model.requested_device())
        result.update(scores=str(Path(out_dir) / SCORES_DIR), overall=summary["overall"], by_tag=summary["by_tag"])
    return result
