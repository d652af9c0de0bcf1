"""Helpers of the Flow-NRG tests: prompts and tiny toy models built in memory."""

from __future__ import annotations

from flowalign.models.toy import ToyModel, build_toy_pipeline

IMAGE_PROMPTS = ["a small red circle in the center", "a large blue square in the top left"]
VIDEO_PROMPTS = [
    "a small red circle in the center moving left",
    "a large blue square in the top left staying still",
]


def tiny_toy(kind: str = "image", *, seed: int = 0, width: int = 32) -> ToyModel:
    """A freshly initialised toy model small enough for millisecond forwards (24x24 images, 4-frame clips)."""
    pipe = build_toy_pipeline(
        kind, size=24, num_frames=4, width=width, num_layers=2, text_width=16, seed=seed
    )
    return ToyModel(pipe)
