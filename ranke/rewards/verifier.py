"""The toy verifier as a reward: GenEval-like correctness read from pixels, non-differentiable.

Each image is checked against its prompt by `ranke.toy.verifier.score_image` (objects detected
by colour segmentation and shape moments, then matched to the caption). The reward is the
whole-prompt correctness (1.0 or 0.0, GenEval's metric) or, with `metric="object_accuracy"`,
the fraction of the caption's objects found (a denser signal for the same check).
"""

from __future__ import annotations

import torch

from ranke.rewards.protocol import check_batch
from ranke.runtime import UserError
from ranke.toy.captions import CaptionSpec, parse_caption
from ranke.toy.verifier import score_image

METRICS = ("correct", "object_accuracy")


class VerifierReward:
    """Reward = verifier verdict per image: `correct` (0/1) or `object_accuracy` (in [0, 1])."""

    differentiable = False

    def __init__(self, metric: str = "correct", name: str = "verifier"):
        if metric not in METRICS:
            raise UserError(f"verifier reward metric '{metric}' is not one of: {', '.join(METRICS)}")
        self.metric = metric
        self.name = name
        self._specs: dict[str, CaptionSpec] = {}

    def _spec(self, prompt: str) -> CaptionSpec:
        """The parsed caption, parsed once per distinct prompt."""
        if prompt not in self._specs:
            try:
                self._specs[prompt] = parse_caption(prompt)
            except ValueError as err:
                raise UserError(f"the verifier reward needs toy-world captions: {err}") from None
        return self._specs[prompt]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        pixels = images.detach().float().clamp(0.0, 1.0).permute(0, 2, 3, 1).cpu().numpy()
        scores = []
        for image, prompt in zip(pixels, prompts):
            result = score_image(image, self._spec(prompt))
            scores.append(float(result.correct) if self.metric == "correct" else result.object_accuracy)
        return torch.tensor(scores, dtype=torch.float32, device=images.device)
