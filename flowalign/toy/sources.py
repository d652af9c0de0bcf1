"""The toy world as data sources of :mod:`flowalign.data.sources`: ``toy:image`` and ``toy:video``.

Importing :mod:`flowalign.toy` registers the ``toy`` scheme. Options (all optional):

- ``kind``: the kind the caller needs (e.g. the model's); it must match the spec's.
- ``split`` ("train" or "heldout", default train), ``num`` (items), ``seed``, ``size``, ``num_frames``.
- pairs: ``wrong_motion_share`` (:func:`flowalign.toy.reward_pairs.build_toy_reward_pairs`).

``toy:video-textured`` (clips only) is the textured world of :mod:`flowalign.toy.texture`: the same
scenes and captions with procedural texture on the shape and the background.

``toy:train`` / ``toy:heldout`` (the older spelling of supervised fine-tuning) still open the
caller's ``kind`` of that split.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from flowalign.data.errors import DataError
from flowalign.data.sources import Want, register_source
from flowalign.toy.data import PrerenderedToy, ToyDataset
from flowalign.toy.world import KINDS, SPLITS

__all__ = ["open_toy_source"]

_RENDER_KEYS = ("num", "seed", "size", "num_frames")
_TEXTURED = "-textured"


def _kind_and_split(name: str, options: dict[str, Any]) -> tuple[str, str]:
    wanted = options.get("kind")
    if name in SPLITS:  # toy:train, toy:heldout
        if wanted is None:
            raise DataError(f"toy:{name}", f"say which kind: {' or '.join(f'toy:{k}' for k in KINDS)}")
        return wanted, name
    if name not in KINDS:
        raise DataError(
            f"toy:{name}", f"unknown toy data; the toy data is {' or '.join(f'toy:{k}' for k in KINDS)}"
        )
    if wanted is not None and wanted != name:
        raise DataError(f"toy:{name}", f"the run needs {wanted} data (toy:{wanted}), not {name}")
    return name, options.get("split", "train")


def open_toy_source(name: str, want: Want, **options: Any) -> Dataset:
    """``toy:<name>`` as ``want`` items (see the module doc)."""
    if name.endswith(_TEXTURED) and name != _TEXTURED:
        return _open_textured(name, want, options)
    kind, split = _kind_and_split(name, options)
    render = {k: options[k] for k in _RENDER_KEYS if options.get(k) is not None}
    if want == "pairs":
        from flowalign.toy.reward_pairs import build_toy_reward_pairs

        num = render.pop("num", 1000)
        share = options.get("wrong_motion_share")
        return build_toy_reward_pairs(num, kind=kind, split=split, wrong_motion_share=share, **render)
    if want == "clips":
        if kind != "video":
            raise DataError(f"toy:{name}", "clips are toy:video")
        return ToyDataset(split, kind=kind, **render)
    return PrerenderedToy(ToyDataset(split, kind=kind, **render))


def _open_textured(name: str, want: Want, options: dict[str, Any]) -> Dataset:
    from flowalign.toy.texture import TexturedToyDataset

    kind, split = _kind_and_split(name.removesuffix(_TEXTURED), options)
    if want != "clips" or kind != "video":
        raise DataError(f"toy:{name}", "the textured toy world gives clips: toy:video-textured")
    render = {k: options[k] for k in _RENDER_KEYS if options.get(k) is not None}
    return TexturedToyDataset(split, kind=kind, **render)


register_source("toy", open_toy_source, examples=tuple(f"toy:{k}" for k in KINDS))
