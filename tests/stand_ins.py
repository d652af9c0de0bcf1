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


class MeanPixelReward(RewardModel):
    """ "bright" = mean pixel value (videos: per frame, then averaged by the base class): a reward with no
    weights, so a test measures the sampler alone."""

    name = "mean-pixel"
    dimensions = ("bright",)
    media_kind = "image"

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        return {"bright": images.mean(dim=(1, 2, 3))}


def registered_mean_pixel() -> str:
    """Register :class:`MeanPixelReward` under its name (once per process); returns the name."""
    from flowalign.rewards.registry import available_rewards, register_reward

    if MeanPixelReward.name not in available_rewards():
        register_reward(MeanPixelReward.name)(
            lambda *, device="cpu", dtype=None, **kwargs: MeanPixelReward(**kwargs)
        )
    return MeanPixelReward.name
