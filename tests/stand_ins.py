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


class Placements:
    """Records the target device of every ``nn.Module.to`` call, by module identity, while the run's
    training device is ``target`` (a distinct device such as ``cpu:0`` that still computes on the CPU)."""

    def __init__(self, monkeypatch, target) -> None:
        import torch
        from torch import nn

        from flowalign.training import runs

        self.last: dict[int, torch.device] = {}
        original = nn.Module.to

        def to(module, *args, **kwargs):
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if device is not None:
                self.last[id(module)] = torch.device(device)
            return original(module, *args, **kwargs)

        monkeypatch.setattr(nn.Module, "to", to)
        monkeypatch.setattr(runs, "training_device", lambda train: target)

    def of(self, module):
        """The last device ``module`` was moved to, or None."""
        return self.last.get(id(module))
