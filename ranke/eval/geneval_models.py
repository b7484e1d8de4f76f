"""The models behind our GenEval scorer (`ranke.eval.geneval`), from local directories only,
and what they give the rules: `Detection`s and colour names.

* `Mask2FormerDetector`: a transformers Mask2FormerForUniversalSegmentation instance-segmentation
  checkpoint (e.g. a COCO-instance Swin-S one saved with `save_pretrained`, with its
  preprocessor_config.json). Its outputs become detections as mmdetection's Mask2Former turns
  them into boxes (`instance_detections`); the weights and the image preprocessing are the
  checkpoint's own, which is why its scores differ from the official evaluator's.
* `ColorClassifier`: zero-shot colour classification with a CLIP directory, loaded by the CLIP
  reward's loader (`ranke.rewards.clip.CLIPReward`; the benchmark uses CLIP ViT-L/14).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ranke.runtime import UserError

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# The zero-shot colour classifier of a class averages these prompts per colour.
COLOR_TEMPLATES = ("a photo of a {color} {name}", "a photo of a {color}-colored {name}", "a photo of a {color} object")
CROP_BACKGROUND = (153, 153, 153)  # grey #999 behind an object's mask


@dataclass(frozen=True, eq=False)  # compared by identity: masks are arrays
class Detection:
    """One detected instance: box (x1, y1, x2, y2) in pixels, score, and its mask (bool [H, W])."""

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None


# COCO label names that GenEval spells differently (its evaluation/object_names.txt).
GENEVAL_NAMES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard", "tvmonitor": "tv",
                 "brocolli": "broccoli"}  # fmt: skip (a misspelling some COCO label lists carry)
MAX_PER_IMAGE = 100  # instances kept per image before any threshold, as mmdetection's Mask2Former test config


def geneval_name(label: str) -> str:
    """A detector label as GenEval names the class ("dining_table" -> "dining table", "mouse" ->
    "computer mouse")."""
    name = " ".join(label.lower().replace("_", " ").replace("-", " ").split())
    return GENEVAL_NAMES.get(name, name)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The tight box (x1, y1, x2, y2) around a bool mask [H, W], x2/y2 one past the last pixel;
    (0, 0, 0, 0) for an empty mask."""
    columns, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if not len(columns):
        return (0.0, 0.0, 0.0, 0.0)
    return (float(columns[0]), float(rows[0]), float(columns[-1] + 1), float(rows[-1] + 1))


def instance_detections(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: list[str], max_per_image: int = MAX_PER_IMAGE
) -> dict[str, list[Detection]]:
    """Detections per class name, best first, from one image's Mask2Former outputs.

    `class_logits` [Q, C + 1] (the last class is "no object"), `mask_logits` [Q, H, W] at the
    image's size. Every (query, class) pair is a candidate scored by the class probability
    (softmax over the C + 1 classes); the `max_per_image` best pairs are kept; each one's mask is
    its query's logits > 0, its score the class probability times the mean sigmoid of the mask
    logits inside the mask (0 for an empty mask), its box the tight box around the mask.
    """
    probabilities = class_logits.float().softmax(dim=-1)[:, :-1]
    num_classes = probabilities.shape[1]
    scores, flat = probabilities.flatten().topk(min(max_per_image, probabilities.numel()))
    logits = mask_logits.float()[flat // num_classes]
    masks = logits > 0
    mask_quality = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    detections: dict[str, list[Detection]] = {}
    classes, final_scores = (flat % num_classes).tolist(), (scores * mask_quality).tolist()
    for class_index, score, mask in zip(classes, final_scores, masks.cpu().numpy()):
        detections.setdefault(labels[class_index], []).append(Detection(mask_box(mask), score, mask))
    return {name: sorted(found, key=lambda d: -d.score) for name, found in detections.items()}


def detector_classes(path: str | Path) -> list[str]:
    """The class names of a Mask2Former directory (its config's id2label, in GenEval's spelling),
    read without loading the weights."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "preprocessor_config.json").is_file():
        raise UserError(
            f"Mask2Former directory '{path}' not found or incomplete (needs config.json, the weights and "
            "preprocessor_config.json, as save_pretrained writes them)"
        )
    labels = json.loads((path / "config.json").read_text()).get("id2label") or {}
    return [geneval_name(labels[key]) for key in sorted(labels, key=int)]


def masks_at_image_size(mask_logits: torch.Tensor, pixel_mask: torch.Tensor, image_size: tuple[int, int]):
    """Mask logits [Q, h, w] of a padded input (`pixel_mask` [H_in, W_in]: 1 on the resized image,
    0 on the padding) at the original image's size [Q, height, width]: bilinear to the input's
    size, the resized image cut out of the padding, bilinear to the image's size."""
    masks = F.interpolate(mask_logits[None].float(), size=pixel_mask.shape, mode="bilinear", align_corners=False)
    rows, columns = int(pixel_mask.any(dim=1).sum()), int(pixel_mask.any(dim=0).sum())
    return F.interpolate(masks[:, :, :rows, :columns], size=image_size, mode="bilinear", align_corners=False)[0]


class Mask2FormerDetector:
    """`detector(image) -> {class name: [Detection, ...]}` for a PIL RGB image (all candidates,
    best first; `ranke.eval.geneval.keep_detections` applies the thresholds)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", max_per_image: int = MAX_PER_IMAGE):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        self.labels = detector_classes(path)
        try:
            self.model = Mask2FormerForUniversalSegmentation.from_pretrained(path, local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load Mask2Former from '{path}': {str(err).splitlines()[0]}") from None
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.max_per_image = max_per_image

    @property
    def classes(self) -> list[str]:
        return list(self.labels)

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> dict[str, list[Detection]]:
        inputs = self.processor(images=image, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device)
        pixel_mask = inputs["pixel_mask"].to(self.device)
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        masks = masks_at_image_size(outputs.masks_queries_logits[0], pixel_mask[0], (image.height, image.width))
        return instance_detections(outputs.class_queries_logits[0], masks, self.labels, self.max_per_image)


def object_crop(image: Image.Image, detection: Detection) -> Image.Image:
    """What the colour classifier sees: the object's mask pixels on grey #999, cropped to its box
    (corners rounded to whole pixels; at least one pixel wide and high)."""
    if detection.mask is not None:
        background = Image.new("RGB", image.size, CROP_BACKGROUND)
        image = Image.composite(image, background, Image.fromarray(np.asarray(detection.mask, dtype=bool)))
    left, top, right, bottom = (int(round(v)) for v in detection.box[:4])
    return image.crop((left, top, max(right, left + 1), max(bottom, top + 1)))


class ColorClassifier:
    """`colors(image, class_name, detections) -> [colour per detection]`: CLIP zero-shot over the
    benchmark's ten colours. A class's classifier holds, per colour, the normalised mean of the
    unit text embeddings of the three templates; a crop gets the colour of highest cosine."""

    def __init__(self, clip_path: str | Path, device: str | torch.device = "cpu"):
        from ranke.rewards.clip import CLIPReward

        self.clip = CLIPReward(clip_path, device, name="geneval_colors")
        self._classifiers: dict[str, torch.Tensor] = {}

    def classifier(self, name: str) -> torch.Tensor:
        """Unit colour embeddings [10, D] of one class."""
        if name not in self._classifiers:
            texts = [template.format(color=color, name=name) for color in COLORS for template in COLOR_TEMPLATES]
            embeddings = self.clip.text_embeddings(texts).view(len(COLORS), len(COLOR_TEMPLATES), -1)
            self._classifiers[name] = F.normalize(embeddings.mean(dim=1), dim=-1)
        return self._classifiers[name]

    @torch.no_grad()
    def __call__(self, image: Image.Image, name: str, detections: list[Detection]) -> list[str]:
        classifier = self.classifier(name)
        colors = []
        for detection in detections:
            pixels = torch.from_numpy(np.array(object_crop(image, detection))).permute(2, 0, 1)[None].float() / 255
            colors.append(COLORS[int((self.clip.image_embeddings(pixels) @ classifier.T).argmax())])
        return colors
