"""Image conditions and expert choice of training runs (shared by the DPO and RWR runs).

Candidate files of ``flowalign pairs`` name each sample's condition image (``"image"``, relative to
the file); runs on a two-expert Wan 2.2 A14B model choose the experts they adapt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowalign.data.errors import DataError
from flowalign.data.paths import resolve_data_path
from flowalign.files import read_jsonl
from flowalign.models.base import FlowModel


def select_train_expert(model: FlowModel, which: str) -> None:
    """Point training at one expert of a two-expert model (Wan 2.2 A14B), or refuse for other models."""
    setter = getattr(model, "set_train_expert", None)
    if setter is not None:
        setter(which)
    elif which != "both":
        raise ValueError(
            f"train_expert={which!r} needs a two-expert model (Wan 2.2 A14B), not {model.family}"
        )


def load_candidate_conditions(path: str | Path) -> tuple[list[str] | None, dict[str, torch.Tensor] | None]:
    """The condition image of each candidates.jsonl row (its ``"image"``, relative to the file), as one
    key per row and the decoded [3, H, W] image per key; (None, None) when the rows have none."""
    from flowalign.data.media import load_image

    path = Path(path)
    rows = list(read_jsonl(path, error=DataError))
    if not any("image" in row for _, row in rows):
        return None, None
    keys, images = [], {}
    for number, row in rows:
        name = row.get("image")
        where = f"line {number}"
        if not isinstance(name, str) or not name:
            raise DataError(path, "no condition 'image' (other rows have one)", where=where)
        if name not in images:
            file = resolve_data_path(path.parent, name, source=path, where=where, key="image")
            images[name] = load_image(file)
        keys.append(name)
    return keys, images
