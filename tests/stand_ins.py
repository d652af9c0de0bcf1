"""Stand-ins shared by several test folders (imported by module name: ``tests/`` is on ``sys.path``)."""

from __future__ import annotations

from torch import Tensor

from flowalign.rewards.base import RewardModel


class BrightnessReward(RewardModel):
    """Differentiable pixel reward: "vq" = mean brightness, "ta" = mean red minus mean blue."""

    name = "brightness"
    dimensions = ("vq", "ta")
    needs_prompts = False

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        return {"vq": images.mean(dim=(1, 2, 3)), "ta": (images[:, 0] - images[:, 2]).mean(dim=(1, 2))}
