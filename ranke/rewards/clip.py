"""CLIP score as a reward: 100 x cosine(image embedding, text embedding).

Used twice in the paper (METHOD.md section 5): CLIP ViT-L/14 as the training reward, and CLIP
ViT-B/32 with the prefix "A photo depicts" as the evaluation CLIP score. The model loads from a
local Hugging Face directory (config, weights, tokenizer files, preprocessor_config.json);
nothing is downloaded.

The score is not clamped at 0 (torchmetrics' CLIPScore clamps): a reward needs its gradient
and its ranking everywhere, and matching captions score well above 0 anyway.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ranke.rewards.base import DualEncoderReward
from ranke.runtime import UserError, read_user_json


def _features(output) -> torch.Tensor:
    """Projected embeddings from `get_*_features` (a tensor in transformers 4, a model output in 5)."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


class CLIPReward(DualEncoderReward):
    """Differentiable CLIP score `100 * cos` in [-100, 100] of images against `prefix + prompt`.

    Images go through CLIP's evaluation transform in torch (bicubic shorter-side resize to the
    model's image size, center crop, the mean/std of the directory's preprocessor_config.json).
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", prefix: str = "", name: str = "clip"):
        from transformers import AutoTokenizer, CLIPModel

        path = Path(path)
        processor_config = path / "preprocessor_config.json"
        if not processor_config.is_file():
            raise UserError(
                f"CLIP model directory '{path}' not found or incomplete (needs config, weights, tokenizer "
                "and preprocessor_config.json); download it once, e.g. with `huggingface-cli download`"
            )
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except OSError as err:
            raise UserError(f"cannot load CLIP from '{path}': {str(err).splitlines()[0]}") from None
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.prefix = prefix
        self.max_text_tokens = self.model.config.text_config.max_position_embeddings
        processor = read_user_json(processor_config, "CLIP preprocessor config")
        if not isinstance(processor, dict) or not {"image_mean", "image_std"} <= processor.keys():
            raise UserError(f"CLIP preprocessor config '{processor_config}' has no image_mean / image_std")
        super().__init__(
            name=name,
            image_size=self.model.config.vision_config.image_size,
            image_mean=processor["image_mean"],
            image_std=processor["image_std"],
            device=device,
            scale=100.0,
        )

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        texts = [f"{self.prefix} {p}" if self.prefix else p for p in prompts]
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        ).to(self.device)
        return _features(self.model.get_text_features(**tokens))

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))
