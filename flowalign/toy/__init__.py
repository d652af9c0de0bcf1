"""The toy world: procedurally drawn shapes with captions and exact pixel oracle rewards.

``world`` holds the vocabulary, scenes, captions and the train/held-out split; ``render`` draws scenes;
``data`` serves them as a torch Dataset or exports them to files; ``oracles`` scores images and clips
against captions from pixels only; ``metrics`` compares sample sets by what the oracles detect;
``language`` pretrains a text encoder on the captions; ``reward_pairs`` builds oracle-labelled reward
pairs; ``sources`` registers ``toy:image`` and ``toy:video`` with :mod:`flowalign.data.sources` (on
import of this package). A library only: the toy flow model family is ``flowalign.models.toy`` and the experiments on the
toy world are in ``flowalign.experiments``.
"""

from flowalign.toy.data import ToyDataset, export_toy_dataset, load_toy_export
from flowalign.toy.oracles import detect_attributes, score_images, score_videos
from flowalign.toy.render import render_image, render_images, render_video, render_videos
from flowalign.toy.sources import open_toy_source
from flowalign.toy.world import (
    COLOURS,
    MOTIONS,
    POSITIONS,
    SHAPES,
    SIZES,
    Attributes,
    Scene,
    all_attributes,
    parse_caption,
    sample_scene,
    sample_scenes,
    split_attributes,
    split_of,
    toy_prompts,
)

__all__ = [
    "COLOURS",
    "MOTIONS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Attributes",
    "Scene",
    "ToyDataset",
    "all_attributes",
    "detect_attributes",
    "export_toy_dataset",
    "load_toy_export",
    "open_toy_source",
    "parse_caption",
    "render_image",
    "render_images",
    "render_video",
    "render_videos",
    "sample_scene",
    "sample_scenes",
    "score_images",
    "score_videos",
    "split_attributes",
    "split_of",
    "toy_prompts",
]
