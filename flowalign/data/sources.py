"""One registry of data sources: a data spec -> a dataset of training items.

A spec is either ``<scheme>:<name>`` for a registered scheme, or a path::

    toy:image, toy:video     the toy world's renders (registered by :mod:`flowalign.toy.sources`)
    toy:video-textured       the same clips with procedural texture (:mod:`flowalign.toy.texture`)
    hf:<dataset id>          a preference dataset on the Hugging Face hub (pairs)
    hf:<id>?streaming=1&rows=N  its first N rows, streamed (no full download) into a local row cache
    manifest.jsonl           media + prompts (media), or a folder holding one
    pairs.jsonl, *.csv/tsv, *.parquet, a folder of parquet shards or a save_to_disk folder  (pairs)
    a folder of video files  (clips)

What a caller wants decides how a path is read: ``"media"`` (``{"pixels", "prompt", "index"}``,
:class:`~flowalign.data.batches.MediaBatch`), ``"pairs"`` (``{"media_w", "media_l", "prompt",
"index"}``, :class:`~flowalign.data.batches.PairBatch`) or ``"clips"`` (``{"pixels"}``). Keyword
options go to the reader (``keep_ties``/``buckets`` for pairs, ``num_frames``/``size`` for clips,
``kind``/``num``/``seed``/... for toy data) and readers ignore the ones they do not use.

The data layer sits below the toy world, so toy data joins by registration: importing
:mod:`flowalign.toy` registers the ``toy`` scheme (:func:`register_source`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from torch.utils.data import Dataset

from flowalign.data.errors import DataError
from flowalign.data.items import ManifestDataset, PairDataset, VideoFolderDataset

__all__ = ["Want", "open_source", "register_source", "registered_sources"]

Want = Literal["media", "pairs", "clips"]
Opener = Callable[..., Dataset]
"""``opener(name, want, **options) -> Dataset`` for a spec ``<scheme>:<name>``."""


@dataclass(frozen=True)
class _Scheme:
    opener: Opener
    examples: tuple[str, ...]


_SCHEMES: dict[str, _Scheme] = {}


def register_source(scheme: str, opener: Opener, *, examples: tuple[str, ...]) -> None:
    """Make ``<scheme>:<name>`` specs open through ``opener(name, want, **options)``.

    ``examples`` are full specs shown in error messages. Registering a scheme again replaces it.
    """
    if not scheme.isidentifier():
        raise ValueError(f"a source scheme is a plain name, got {scheme!r}")
    _SCHEMES[scheme] = _Scheme(opener, tuple(examples))


def registered_sources() -> dict[str, tuple[str, ...]]:
    """Each registered scheme with its example specs."""
    return {name: s.examples for name, s in sorted(_SCHEMES.items())}


def _check_want(want: str) -> None:
    if want not in get_args(Want):
        raise ValueError(f"want must be one of {list(get_args(Want))}, got {want!r}")


def open_source(spec: str | Path, want: Want, **options: Any) -> Dataset:
    """The dataset of ``spec`` as ``want`` items (see the module doc).

    Raises:
        DataError: an unknown scheme, a scheme without a name, a missing path, or a path that cannot
            give ``want`` items; the message names the spec and the spellings that work.
    """
    _check_want(want)
    text = str(spec)
    scheme, colon, name = text.partition(":")
    if colon and scheme in _SCHEMES:
        if not name:
            raise DataError(text, f"needs a name after '{scheme}:', e.g. {_examples(scheme)}")
        return _SCHEMES[scheme].opener(name, want, **options)
    if colon and scheme.isidentifier() and len(scheme) > 1 and not Path(text).exists():
        known = [e for s in _SCHEMES.values() for e in s.examples]
        raise DataError(text, f"unknown data source scheme {scheme!r}; known: {known} or a path")
    if text in _SCHEMES and not Path(text).exists():
        raise DataError(text, f"no such file or folder; the {text} data is spelled {_examples(text)}")
    return _open_path(Path(text), want, **options)


def _examples(scheme: str) -> str:
    return " or ".join(_SCHEMES[scheme].examples)


def _open_path(path: Path, want: Want, **options: Any) -> Dataset:
    if not path.exists():
        raise DataError(path, "does not exist")
    if want == "pairs":
        return _pairs(path, **options)
    if want == "clips":
        if not path.is_dir():
            raise DataError(path, "clips are read from a folder of video files")
        return VideoFolderDataset(path, num_frames=options["num_frames"], size=options["size"])
    manifest = path / "manifest.jsonl" if path.is_dir() else path
    if manifest.suffix != ".jsonl":
        raise DataError(path, "media + prompts are read from a manifest.jsonl (or a folder holding one)")
    return ManifestDataset(manifest)


def _open_hub(name: str, want: Want, **options: Any) -> Dataset:
    if want != "pairs":
        raise DataError(f"hf:{name}", f"hub datasets give preference pairs, not {want}")
    return _pairs(f"hf:{name}", **options)


def _pairs(spec: str | Path, **options: Any) -> Dataset:
    return PairDataset(spec, keep_ties=options.get("keep_ties", False), buckets=options.get("buckets"))


register_source("hf", _open_hub, examples=("hf:<dataset id>",))
