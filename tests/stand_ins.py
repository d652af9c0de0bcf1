"""Stand-ins shared by several test folders (imported by module name: ``tests/`` is on ``sys.path``)."""

from __future__ import annotations

from pathlib import Path

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


def random_image_pairs(folder, sizes) -> Path:
    """A preference file ``folder/pairs.jsonl`` of one pair per ``(height, width)`` in ``sizes``: two
    uniform-noise images each (seed 0, drawn pair by pair, A before B), prompt ``"shape k"``, label A."""
    import json

    import torch

    from flowalign.data.media import save_image

    g = torch.Generator().manual_seed(0)
    rows = []
    for k, (h, w) in enumerate(sizes):
        for side in "AB":
            save_image(torch.rand(3, h, w, generator=g), folder / f"{k}{side}.png")
        rows.append({"prompt": f"shape {k}", "path_A": f"{k}A.png", "path_B": f"{k}B.png", "label": "A"})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def brightness_pairs_per_family(tiny_model_dir, tmp_path_factory, prompts, config_of):
    """``get(family)``: a folder with candidates and pairs of that family's tiny model, ranked by mean
    brightness, built once per family (``config_of(family)``: the keyword arguments of ``PairsConfig``)."""
    from flowalign.models import load_flow_model
    from flowalign.workflows.pairs import PairsConfig, build_pairs

    made = {}

    def brightness(media, prompts):
        b = media.flatten(1).mean(1)
        return {"bright": b, "overall": b}

    def get(family):
        if family not in made:
            out = tmp_path_factory.mktemp(f"pairs-{family}")
            model = load_flow_model(tiny_model_dir(family))
            config = PairsConfig(num_candidates=2, num_inference_steps=2, **config_of(family))
            build_pairs(model, prompts, brightness, out, config, progress=False)
            made[family] = out
        return made[family]

    return get
