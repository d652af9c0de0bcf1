"""The toy world's exact oracles as a reward model named ``"toy"``.

Wraps :func:`flowalign.toy.oracles.score_images` (dimensions ``vq``, ``ta``) and
:func:`flowalign.toy.oracles.score_videos` (``vq``, ``mq``, ``ta``); their per-attribute keys
(``ta_shape``, ``ta_colour``, ..., ``all_correct``) are returned too, as diagnostics. The oracles
detect objects with thresholds and argmax, so they are not differentiable, and they have no
weights: they run on the media's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowalign.rewards.base import RewardModel

__all__ = ["ToyOracleReward", "load_toy"]


class ToyOracleReward(RewardModel):
    """Exact toy rewards: visual quality ``vq``, motion quality ``mq`` (videos) and text alignment ``ta``.

    Args:
        batch_size: images (or video frames) per oracle call.
    """

    name = "toy"
    dimensions = ("vq", "mq", "ta")
    media_kind = "both"
    differentiable = False

    def __init__(self, *, batch_size: int = 64) -> None:
        super().__init__(batch_size=batch_size, text_cache_size=0)

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        from flowalign.toy.oracles import score_images

        assert prompts is not None
        return score_images(images, prompts)

    def _score_videos(self, videos: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        from flowalign.toy.oracles import score_videos

        assert prompts is not None
        return score_videos(videos, prompts)


def load_toy(
    *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 64
) -> ToyOracleReward:
    """The toy oracle reward; ``device`` and ``dtype`` are accepted for the registry and unused
    (there are no weights: scores are computed where the media is)."""
    return ToyOracleReward(batch_size=batch_size)
