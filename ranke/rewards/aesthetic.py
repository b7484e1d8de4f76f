"""The LAION aesthetic score as a reward: a small MLP over unit-norm CLIP ViT-L/14 image embeddings.

The predictor of christophschuhmann/improved-aesthetic-predictor (`sac+logos+ava1-l14-linearMSE.pth`,
the file the RankE release points its `reward_path_aesthetic` at) is five linear layers with dropout
between the first four and no activation,

    768 -> 1024 -> 128 -> 64 -> 16 -> 1,   state-dict keys layers.{0,2,4,6,7}.{weight,bias},

applied to the CLIP image embedding divided by its norm; scores are on the AVA scale (about 1-10,
good photographs 5-7). It does not read the prompt. The CLIP image tower is the `clip` reward's
(`CLIPReward`, same preprocessing), so a run with both rewards holds one CLIP.

The release's own MLP class has ReLUs and its Linear layers at indices 0, 3, 6, 9 and 12, which
this file's keys do not fit; the release catches the load error and sets the aesthetic weight to
0, so its aesthetic reward is silently off with the file it names. Ours loads the file as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ranke.models.load import layout_of, load_into, read_state_dict
from ranke.rewards.protocol import check_batch
from ranke.rewards.clip import CLIPReward
from ranke.runtime import UserError

AESTHETIC_WIDTHS = (1024, 128, 64, 16, 1)
AESTHETIC_DROPOUT = (0.2, 0.2, 0.1)


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP (linearMSE layout): Linear/Dropout pairs, no activation."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        widths = (input_size, *AESTHETIC_WIDTHS)
        layers: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if i < len(AESTHETIC_DROPOUT):
                layers.append(nn.Dropout(AESTHETIC_DROPOUT[i]))
        self.layers = nn.Sequential(*layers)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings [B, D] -> scores [B]."""
        return self.layers(embeddings)[:, 0]


def load_aesthetic_head(path: str | Path, input_size: int, trust_pickle: bool = False) -> AestheticHead:
    """The predictor from its local `.pth` (a bare state dict) or a `.safetensors` copy, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"aesthetic predictor '{path}' not found; download sac+logos+ava1-l14-linearMSE.pth from "
            "christophschuhmann/improved-aesthetic-predictor and pass its path (aesthetic_path=...)"
        )
    head = AestheticHead(input_size)
    state = read_state_dict(path, trust_pickle)
    if set(state) != set(layout_of(head)):
        raise UserError(
            f"'{path}' is not an improved-aesthetic-predictor linear MLP for {input_size}-d CLIP embeddings "
            f"(keys {sorted(state)[:4]}...; expected layers.0/2/4/6/7)"
        )
    load_into(head, state)
    return head.eval().requires_grad_(False)


class AestheticReward:
    """LAION aesthetic score of images (prompts are ignored), differentiable through CLIP's image tower."""

    differentiable = True

    def __init__(self, clip: CLIPReward, head: AestheticHead, name: str = "aesthetic"):
        projection = clip.model.config.projection_dim
        if head.layers[0].in_features != projection:
            raise UserError(
                f"the aesthetic predictor reads {head.layers[0].in_features}-d embeddings but the CLIP model "
                f"gives {projection}-d ones: use CLIP ViT-L/14 (clip_path) with the L/14 predictor"
            )
        self.clip = clip
        self.head = head.to(clip.device)
        self.name = name

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        return self.head(self.clip.image_embeddings(images))
