"""HPSv2.1 (Human Preference Score v2.1) as a differentiable reward.

HPSv2 is an OpenCLIP ViT-H-14 fine-tuned on human preference pairs (Wu et al. 2023). Its
official scorer (`hpsv2.score`) builds OpenCLIP ViT-H-14, loads `checkpoint["state_dict"]`
from `HPS_v2.1_compressed.pt`, and scores an image against its prompt as the diagonal of
`image_features @ text_features.T` with both features unit-normalised: the plain cosine,
without the logit scale (typical values 0.2-0.3; METHOD.md reports averages 0.22-0.25).
Its evaluation transform is: to float tensor, bicubic resize of the shorter side to 224,
center crop 224, OpenAI CLIP mean/std. We reproduce it in torch so gradients reach the pixels.

Needs the optional extra (`pip install 'ranke[hpsv2]'`, i.e. open_clip_torch); the vendored
copy inside the `hpsv2` package is used when open_clip itself is absent. The model is built
without pretrained weights (no download) and then filled from the local HPS checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ranke.rewards.base import DualEncoderReward
from ranke.runtime import UserError

# OpenAI CLIP pixel statistics, OpenCLIP's default for ViT-H-14.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _import_open_clip():
    """OpenCLIP from `open_clip_torch`, else the copy vendored by the `hpsv2` package."""
    try:
        import open_clip

        return open_clip
    except ImportError:
        pass
    try:
        from hpsv2.src import open_clip

        return open_clip
    except ImportError:
        raise UserError(
            "the HPSv2 reward needs OpenCLIP, which is not installed: pip install 'ranke[hpsv2]'"
        ) from None


class HPSv2Reward(DualEncoderReward):
    """HPSv2.1 score of images against prompts: cosine of OpenCLIP ViT-H-14 embeddings."""

    def __init__(
        self,
        checkpoint_path: str | Path,
        device: str | torch.device = "cpu",
        model_name: str = "ViT-H-14",
        name: str = "hpsv2",
    ):
        open_clip = _import_open_clip()
        checkpoint_path = Path(checkpoint_path)
        if not checkpoint_path.is_file():
            raise UserError(
                f"HPSv2 checkpoint '{checkpoint_path}' not found; download HPS_v2.1_compressed.pt "
                "from the xswu/HPSv2 Hugging Face repository and pass its path"
            )
        try:
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UserError(f"cannot read HPSv2 checkpoint '{checkpoint_path}': {str(err).splitlines()[0]}") from None
        state_dict = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
        self.model = open_clip.create_model(model_name, pretrained=None)
        try:
            self.model.load_state_dict(state_dict)
        except RuntimeError as err:
            raise UserError(
                f"'{checkpoint_path}' does not fit OpenCLIP {model_name}: {str(err).splitlines()[0]}"
            ) from None
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        image_size = self.model.visual.image_size
        super().__init__(
            name=name,
            image_size=image_size[0] if isinstance(image_size, (tuple, list)) else image_size,
            image_mean=getattr(self.model.visual, "image_mean", None) or OPENAI_CLIP_MEAN,
            image_std=getattr(self.model.visual, "image_std", None) or OPENAI_CLIP_STD,
            device=device,
            scale=1.0,
        )

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self.device))

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)
