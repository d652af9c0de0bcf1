"""The training data of the one-step methods: prompts only, or media with captions (the
discriminator's real side), and :class:`OneStepData`, the config block that picks one source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from flowalign.config import ConfigError
from flowalign.files import read_jsonl

__all__ = ["MediaTextDataset", "OneStepData", "PromptDataset", "build_dataset"]


class PromptDataset(Dataset):
    """Prompts only (data-free distillation, DI*): item ``{"prompt", "index"}``, plus ``"condition"``
    ([3, H, W], read from ``images``: one file per prompt) for image-conditioned teachers."""

    def __init__(self, prompts: Sequence[str], images: Sequence[Path] | None = None) -> None:
        self.prompts = list(prompts)
        self.images = None if images is None else list(images)
        if not self.prompts:
            raise ValueError("PromptDataset: the prompt list is empty")
        for i, p in enumerate(self.prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"PromptDataset: prompt {i} is empty or not a string: {p!r}")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        item = {"prompt": self.prompts[i], "index": i}
        if self.images is not None:
            from flowalign.data.media import load_image

            item["condition"] = load_image(self.images[i])
        return item


class MediaTextDataset(Dataset):
    """Real (or teacher-generated) media with captions from a manifest.jsonl (the discriminator's "real" side).

    Each line needs ``"prompt"`` and ``"file"`` (a path relative to the manifest's folder), which is the
    format ``flowalign generate`` writes, so teacher samples can serve as the real data (data-free).
    Item: ``{"prompt", "pixels": [3, H, W] or [T, 3, H, W] in [0, 1], "index"}``, plus ``"condition"``
    (the row's ``"image"``, [3, H, W]) for image-conditioned teachers (edit, image-to-video).
    """

    def __init__(self, manifest: str | Path) -> None:
        from flowalign.data.paths import resolve_data_path

        self.manifest = Path(manifest)
        if not self.manifest.is_file():
            raise ValueError(f"real-data manifest {self.manifest} does not exist")
        self.rows: list[dict] = []
        for number, row in read_jsonl(self.manifest):
            for key in ("prompt", "file"):
                if not isinstance(row.get(key), str) or not row[key]:
                    raise ValueError(f"{self.manifest}: line {number} has no {key!r} string")
            where = f"line {number}"
            file = resolve_data_path(
                self.manifest.parent, row["file"], source=self.manifest, where=where, key="file"
            )
            image = row.get("image")
            if image is not None:
                image = resolve_data_path(
                    self.manifest.parent, image, source=self.manifest, where=where, key="image"
                )
            self.rows.append({**row, "path": file, "where": where, "image": image})
        if not self.rows:
            raise ValueError(f"{self.manifest}: no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        from flowalign.data.paths import load_row_media

        row = self.rows[i]
        pixels = load_row_media(row["path"], source=self.manifest, where=row["where"], key="file")
        item = {"prompt": row["prompt"], "pixels": pixels, "index": i}
        if row["image"] is not None:
            item["condition"] = load_row_media(
                row["image"], source=self.manifest, where=row["where"], key="image"
            )
        return item


@dataclass(kw_only=True)
class OneStepData:
    """Where prompts (and the discriminator's real media) come from; exactly one source is used."""

    toy_items: int = 0
    """> 0: that many toy-world renders of the train split (prompts + real pixels)."""
    real_manifest: Path | None = None
    """manifest.jsonl with "prompt" and "file" per line (real images, or teacher samples from flowalign generate)."""
    prompts_file: Path | None = None
    """Prompts only (.txt/.jsonl/.json/.csv): data-free DI*, or f-distill without discriminator; an image
    column names each prompt's condition image (image-conditioned teachers)."""

    def __post_init__(self) -> None:
        if self.toy_items < 0:
            raise ConfigError(f"must be >= 0, got {self.toy_items}", key="toy_items")


def build_dataset(data: OneStepData, *, kind: str, needs_real: bool) -> Dataset:
    """The training dataset of a one-step run from :class:`OneStepData` (first source set wins).

    Raises:
        ValueError: no source, or only prompts where real media are needed.
    """
    if data.toy_items > 0:
        import flowalign.toy  # noqa: F401  (registers the toy: data sources)
        from flowalign.data.sources import open_source

        return open_source(f"toy:{kind}", "media", num=data.toy_items)
    if data.real_manifest is not None:
        return MediaTextDataset(data.real_manifest)
    if data.prompts_file is not None:
        if needs_real:
            raise ValueError(
                f"data.prompts_file={data.prompts_file} gives prompts only, but the discriminator needs real "
                "media: set data.real_manifest (e.g. the manifest.jsonl of flowalign generate on the teacher)"
            )
        from flowalign.data.prompts import load_conditioned_prompts

        return PromptDataset(*load_conditioned_prompts(data.prompts_file))
    raise ValueError("no training data: set data.toy_items, data.real_manifest or data.prompts_file")
