"""The SFT data of ``flowalign train sft``: media files and prompts listed in a manifest.jsonl."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from flowalign.data.errors import DataError
from flowalign.data.paths import load_row_media, resolve_data_path
from flowalign.files import read_jsonl


class ManifestDataset(Dataset):
    """Media + prompts listed in a manifest.jsonl ({"file" or "path", "prompt"}, paths relative to it);
    an ``"image"`` on every row is each sample's condition image (image-conditioned families)."""

    def __init__(self, manifest: str | Path):
        self.manifest = Path(manifest)
        if not self.manifest.is_file():
            raise DataError(self.manifest, "manifest not found")
        self.rows = []
        for number, row in read_jsonl(self.manifest, error=DataError):
            file = row.get("file") or row.get("path")
            prompt = row.get("prompt")
            if not file or not isinstance(prompt, str) or not prompt.strip():
                raise DataError(
                    self.manifest, "needs a non-empty 'prompt' and a 'file'", where=f"line {number}"
                )
            where = f"line {number}"
            path = resolve_data_path(
                self.manifest.parent, file, source=self.manifest, where=where, key="file"
            )
            image = row.get("image")
            if image is not None:
                image = resolve_data_path(
                    self.manifest.parent, image, source=self.manifest, where=where, key="image"
                )
            self.rows.append((path, prompt, where, image))
        if not self.rows:
            raise DataError(self.manifest, "has no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        path, prompt, where, image = self.rows[i]
        pixels = load_row_media(path, source=self.manifest, where=where, key="file")
        item = {"pixels": pixels, "prompt": prompt, "index": i}
        if image is not None:
            item["condition"] = load_row_media(image, source=self.manifest, where=where, key="image")
        return item
