"""ImageReward (Xu et al. 2023) as a reward, rebuilt on transformers' BLIP classes.

ImageReward is BLIP (a ViT-L/16 image tower and a BERT-base text encoder with cross-attention to
the image tokens) plus an MLP on the text encoder's first hidden state:

    image -> bicubic resize 224, center crop, OpenAI CLIP mean/std -> ViT -> image tokens
    prompt -> BERT tokens (bert-base-uncased, padded/truncated to 35) -> BERT with cross-attention
    hidden[:, 0] -> MLP (the LAION aesthetic MLP's layout, 768 -> ... -> 1) -> (s - 0.16717) / 1.03334

Its checkpoint `ImageReward.pt` (THUDM/ImageReward) is a bare state dict in the original BLIP
code's names (`blip.visual_encoder.*` timm-style ViT, `blip.text_encoder.*` BERT, `mlp.layers.*`).
`convert_state_dict` renames it for `BlipVisionModel` / `BlipTextModel`; every other size is read
off the tensors' shapes, only the head counts (16 and 12 in the released model) are not. The
tokenizer is bert-base-uncased from a local directory (the `image-reward` package fetches it from
the hub at load time, so it is not used here and no extra package is needed).

Unlike the release, which scores `to_pil_image` copies without gradient, this scorer takes the
[0, 1] tensors through the same transform in torch, so it is differentiable like CLIP; set
`reward_gradient: {image_reward: false}` for the release's behaviour.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ranke.models.load import compare_state_dict, layout_of, read_state_dict
from ranke.rewards.aesthetic import AestheticHead
from ranke.rewards.base import normalize_pixels, resize_center_crop
from ranke.rewards.protocol import check_batch
from ranke.rewards.hpsv2 import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ranke.runtime import UserError

# ImageReward's standardisation of the MLP output (ImageReward.py in THUDM/ImageReward)
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_TEXT_TOKENS = 35

# original BLIP names -> transformers' BLIP names (the text encoder already uses BERT's)
VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)
# parts of the BLIP pre-training model ImageReward's file carries but never uses
UNUSED_KEYS = ("blip.vision_proj.*", "blip.text_proj.*", "blip.text_encoder.embeddings.position_ids")


@dataclass
class ImageRewardArgs:
    """What a state dict's shapes do not say: the attention head counts (ViT-L 16, BERT-base 12)."""

    vision_heads: int = 16
    text_heads: int = 12


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt's names -> `ImageRewardModel`'s (`vision.*`, `text.*`, `mlp.*`); unused parts dropped."""
    converted = {}
    for key, value in state.items():
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in UNUSED_KEYS):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder.") :]
            for pattern, replacement in VISION_RENAMES:
                name = re.sub(pattern, replacement, name)
            converted["vision." + name] = value
        elif key.startswith("blip.text_encoder."):
            converted["text." + key[len("blip.text_encoder.") :]] = value
        else:
            converted[key] = value
    return converted


def _count_layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for key in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def configs_from_state_dict(state: dict[str, torch.Tensor], args: ImageRewardArgs):
    """(BlipVisionConfig, BlipTextConfig) sized by a converted state dict's tensors."""
    from transformers import BlipTextConfig, BlipVisionConfig

    try:
        patch = state["vision.embeddings.patch_embedding.weight"]
        positions = state["vision.embeddings.position_embedding"].shape[1]
        words = state["text.embeddings.word_embeddings.weight"]
        cross_key = state["text.encoder.layer.0.crossattention.self.key.weight"]
    except KeyError as err:
        raise UserError(f"not an ImageReward checkpoint: no tensor for {err.args[0]}") from None
    grid = round((positions - 1) ** 0.5)
    vision = BlipVisionConfig(
        hidden_size=patch.shape[0],
        intermediate_size=state["vision.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count_layers(state, "vision.encoder.layers."),
        num_attention_heads=args.vision_heads,
        image_size=grid * patch.shape[-1],
        patch_size=patch.shape[-1],
        layer_norm_eps=1e-6,  # the timm ViT BLIP uses
    )
    text = BlipTextConfig(
        vocab_size=words.shape[0],
        hidden_size=words.shape[1],
        encoder_hidden_size=cross_key.shape[1],
        intermediate_size=state["text.encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=_count_layers(state, "text.encoder.layer."),
        num_attention_heads=args.text_heads,
        max_position_embeddings=state["text.embeddings.position_embeddings.weight"].shape[0],
        is_decoder=True,  # builds the cross-attention layers; forward runs bidirectionally (is_decoder=False)
        bos_token_id=None,  # generation ids, unused by a scorer
        sep_token_id=None,
    )
    return vision, text


class ImageRewardModel(nn.Module):
    """BLIP image tower + cross-attending BERT + score MLP, in transformers' BLIP modules."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticHead(text_config.hidden_size)

    @property
    def image_size(self) -> int:
        return self.vision.config.image_size

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Standardised ImageReward scores [B] of model-ready pixels [B, 3, S, S] and their prompts' tokens."""
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
        hidden = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state
        return (self.mlp(hidden[:, 0].float()) - SCORE_MEAN) / SCORE_STD


def load_image_reward_model(
    path: str | Path, args: ImageRewardArgs = ImageRewardArgs(), trust_pickle: bool = False
) -> ImageRewardModel:
    """`ImageRewardModel` from a local ImageReward.pt (or a safetensors copy), strict, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"ImageReward checkpoint '{path}' not found; download ImageReward.pt from the THUDM/ImageReward "
            "Hugging Face repository and pass its path (image_reward_path=...)"
        )
    state = convert_state_dict(read_state_dict(path, trust_pickle))
    model = ImageRewardModel(*configs_from_state_dict(state, args))
    ignore = ("text.embeddings.position_ids",)
    problems = compare_state_dict(layout_of(model), state, ignore)
    if problems:
        raise UserError(f"'{path}' does not fit ImageReward's layout: " + "; ".join(problems[:3]))
    model.load_state_dict(state, strict=False)
    return model.eval().requires_grad_(False)


class ImageRewardScorer:
    """ImageReward score of images against prompts (about -2..2; 0 is ImageReward's average)."""

    differentiable = True

    def __init__(
        self,
        checkpoint_path: str | Path,
        tokenizer_path: str | Path,
        device: str | torch.device = "cpu",
        args: ImageRewardArgs = ImageRewardArgs(),
        name: str = "image_reward",
    ):
        from transformers import BertTokenizer

        tokenizer_path = Path(tokenizer_path or "")
        if not any((tokenizer_path / name).is_file() for name in ("vocab.txt", "tokenizer.json")):
            raise UserError(
                f"ImageReward needs a local bert-base-uncased tokenizer directory (vocab.txt or tokenizer.json) "
                f"(image_reward_tokenizer=...), got '{tokenizer_path}'"
            )
        self.tokenizer = BertTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        self.model = load_image_reward_model(checkpoint_path, args).to(device)
        self.device = torch.device(device)
        self.name = name

    def tokens(self, prompts: list[str]):
        return self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
        ).to(self.device)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        pixels = resize_center_crop(images.to(self.device, torch.float32), self.model.image_size)
        pixels = normalize_pixels(pixels, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        tokens = self.tokens(prompts)
        return self.model(pixels, tokens.input_ids, tokens.attention_mask)
