"""Condition images of one-step distillation runs on image-conditioned teachers (Wan image-to-video).

The generator of an image-to-video teacher maps noise *and* a condition image to a video in one call,
x0 = z - v_G(z, 1, c, image), so every prompt of the run comes with its image: a prompts file with an
``image`` column (:func:`flowalign.data.prompts.load_conditioned_prompts`) or a real-data manifest whose
rows name one (``"image"``, relative to the manifest, as ``flowalign generate --image`` writes it).
Items then carry ``"condition"`` ([3, H, W] in [0, 1]); the teacher, the generator and the fake score
read the same image (CFG keeps it in the unconditional pass, as the family's pipeline does).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from flowalign.models.base import FlowModel, PromptEmbeds


class ConditionedItems(Dataset):
    """``dataset``'s items with ``"condition"``: the image at ``images[i]`` (decoded once, then kept)."""

    def __init__(self, dataset: Dataset, images: Sequence[Path]) -> None:
        if len(images) != len(dataset):
            raise ValueError(f"{len(images)} condition images for {len(dataset)} items")
        self.dataset, self.images = dataset, list(images)
        self._decoded: dict[Path, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        from flowalign.data.images import load_image

        path = self.images[i]
        if path not in self._decoded:
            self._decoded[path] = load_image(path)
        return {**self.dataset[i], "condition": self._decoded[path]}


def with_conditions(dataset: Dataset, images: Sequence[Path] | None) -> Dataset:
    """``dataset`` unchanged without images, else :class:`ConditionedItems`."""
    return dataset if images is None else ConditionedItems(dataset, images)


def manifest_conditions(manifest: Path, rows: list[dict]) -> list[Path] | None:
    """Each manifest row's condition image (``"image"``: a path relative to the manifest's folder, or
    absolute, as ``flowalign generate --image`` records it), or None when no row names one.

    Raises:
        ValueError: a row without an image where others have one, or an image file that does not exist.
    """
    if not any("image" in row for row in rows):
        return None
    out = []
    for row in rows:
        name = row.get("image")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{manifest}: {row['where']} has no condition 'image' (other rows have one)")
        path = Path(name) if Path(name).is_absolute() else manifest.parent / name
        if not path.is_file():
            raise ValueError(f"{manifest}: {row['where']}: condition image {path} does not exist")
        out.append(path)
    return out


def encode_with_images(
    teacher: FlowModel,
    prompts: Sequence[str],
    *,
    with_uncond: bool,
    images: Sequence | None,
    size: tuple[int, int, int],
) -> tuple[PromptEmbeds, PromptEmbeds | None]:
    """The teacher's prompt embeddings (no grad), with the condition images for media of ``size``
    (height, width, num_frames) where given.

    Raises:
        ValueError: a teacher that makes media from an image, given no images (one line naming the fix).
    """
    if images is None and teacher.requires_images:
        raise ValueError(
            f"the {teacher.family} teacher makes video from an image: give data.prompts_file an 'image' "
            "column, or data.real_manifest rows an 'image' (one condition image per prompt)"
        )
    with torch.no_grad():
        if images is None:
            return teacher.encode_prompt(list(prompts), with_uncond=with_uncond)
        height, width, frames = size
        return teacher.encode_prompt(
            list(prompts),
            with_uncond=with_uncond,
            images=list(images),
            height=height,
            width=width,
            num_frames=frames,
        )


def refuse_two_experts(teacher: FlowModel) -> None:
    """Refuse a two-expert teacher (Wan 2.2 A14B): a one-step student of it is not meaningful.

    The generator is one network called once, at t = 1, where the pipeline always runs the high-noise
    expert: the student would be that expert alone, and the low-noise expert (half the model, the one
    that makes the detail) would be neither distilled into it nor used when it samples.
    """
    if getattr(teacher, "two_experts", False):
        raise ValueError(
            f"one-step distillation of a two-expert {teacher.family} teacher (Wan 2.2 A14B) is not supported: "
            "the one-step generator runs only at t = 1, where only the high-noise expert acts, so the "
            "low-noise expert would be neither distilled nor used; distil a one-network model "
            "(Wan 2.2 TI2V-5B, Wan 2.1) instead"
        )
