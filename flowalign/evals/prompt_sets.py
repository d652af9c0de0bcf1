"""Prompt sets for evaluations: the toy world's built-in sets and standard benchmarks read from local files.

A prompt set is named by a spec string, the form ``flowalign eval --prompts`` takes:

- a built-in set: ``toy-train``, ``toy-heldout`` (images), ``toy-video-train``, ``toy-video-heldout``;
- a benchmark file or folder: ``parti:PATH`` (PartiPrompts ``.tsv``, grouped by ``Category``),
  ``hpdv2:PATH`` (the HPDv2 benchmark: a folder of ``anime.json``, ``concept-art.json``,
  ``paintings.json``, ``photo.json`` or one of them; grouped by style), ``vbench:PATH``
  (``VBench_full_info.json``, grouped by its first ``dimension``, or a ``.txt`` prompt list / a folder
  of per-dimension ``.txt`` lists), ``geneval:PATH`` (``evaluation_metadata.jsonl``, grouped by ``tag``);
- any prompt file :func:`flowalign.data.prompts.load_prompts` reads (``.txt``, ``.jsonl``, ``.json``,
  ``.csv``, ``.tsv``).

Any spec may end in ``@N`` to keep N prompts spread evenly over the set (``toy-heldout@16``): the toy
sets are ordered shape-first, so the first N would all be circles. Nothing is downloaded: benchmark
files must be on disk (no test or CI run reaches the network).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowalign.data.errors import DataError
from flowalign.data.prompts import load_conditioned_prompts, load_prompt_records

__all__ = [
    "BENCHMARK_LOADERS",
    "BUILTIN_SETS",
    "PromptSet",
    "builtin_prompt_sets",
    "load_prompt_set",
    "spread_indices",
]

BUILTIN_SETS: dict[str, tuple[str, str]] = {
    "toy-train": ("train", "image"),
    "toy-heldout": ("heldout", "image"),
    "toy-video-train": ("train", "video"),
    "toy-video-heldout": ("heldout", "video"),
}
"""Built-in set name -> (toy split, media kind)."""

HPDV2_STYLES: tuple[str, ...] = ("anime", "concept-art", "paintings", "photo")


@dataclass(frozen=True)
class PromptSet:
    """An ordered list of prompts with where it came from.

    Attributes:
        name: the set's name in reports (the spec without its path, e.g. ``"parti"``).
        prompts: the prompts, in order; duplicates are kept (benchmarks repeat prompts on purpose).
        source: the spec or file it was read from.
        kind: ``"image"`` or ``"video"`` when the set is for one kind of media, else None.
        groups: one group label per prompt (Parti category, GenEval tag, ...), or empty.
        is_toy: every prompt is a toy-world caption (toy metrics and references apply).
        images: one condition image file per prompt (image-to-video, edit), or empty.
    """

    name: str
    prompts: tuple[str, ...]
    source: str
    kind: str | None = None
    groups: tuple[str, ...] = field(default_factory=tuple)
    is_toy: bool = False
    images: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError(f"prompt set {self.name!r} ({self.source}): no prompts")
        if self.images and len(self.images) != len(self.prompts):
            raise ValueError(
                f"prompt set {self.name!r}: {len(self.images)} condition images for {len(self.prompts)} prompts"
            )
        if self.groups and len(self.groups) != len(self.prompts):
            raise ValueError(
                f"prompt set {self.name!r}: {len(self.groups)} group labels for {len(self.prompts)} prompts"
            )

    @classmethod
    def from_prompts(
        cls, name: str, prompts: list[str] | tuple[str, ...], *, kind: str | None = None
    ) -> PromptSet:
        """A set from a literal list (``is_toy`` is detected from the captions)."""
        prompts = tuple(prompts)
        return cls(name=name, prompts=prompts, source="<list>", kind=kind, is_toy=_all_toy(prompts))

    def take(self, count: int) -> PromptSet:
        """``count`` prompts spread evenly over the set (see :func:`spread_indices`)."""
        idx = spread_indices(len(self.prompts), count)
        return PromptSet(
            name=self.name,
            prompts=tuple(self.prompts[i] for i in idx),
            source=f"{self.source}@{count}",
            kind=self.kind,
            groups=tuple(self.groups[i] for i in idx) if self.groups else (),
            is_toy=self.is_toy,
            images=tuple(self.images[i] for i in idx) if self.images else (),
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (without the prompts)."""
        return {
            "name": self.name,
            "source": self.source,
            "kind": self.kind,
            "num_prompts": len(self.prompts),
            "is_toy": self.is_toy,
        }


def spread_indices(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)``: i * total // count.

    Raises:
        ValueError: ``count`` < 1 or more than ``total``.
    """
    if not 1 <= count <= total:
        raise ValueError(f"cannot take {count} prompts from a set of {total} (need 1 <= N <= {total})")
    return [i * total // count for i in range(count)]


def _all_toy(prompts: tuple[str, ...] | list[str]) -> bool:
    from flowalign.toy.world import parse_caption

    try:
        for prompt in prompts:
            parse_caption(prompt)
    except ValueError:
        return False
    return True


def builtin_prompt_sets() -> list[str]:
    """Names of the built-in sets."""
    return sorted(BUILTIN_SETS)


def _builtin(name: str) -> PromptSet:
    from flowalign.toy.world import toy_prompts

    split, kind = BUILTIN_SETS[name]
    return PromptSet(name=name, prompts=tuple(toy_prompts(split, kind)), source=name, kind=kind, is_toy=True)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise DataError(path, "prompt set file does not exist")


def _parti(path: Path) -> PromptSet:
    _check_exists(path)
    records = load_prompt_records(path, key="Prompt" if path.suffix.lower() in (".tsv", ".csv") else None)
    groups = tuple(str(r.get("Category", "")) for r in records) if "Category" in records[0] else ()
    return PromptSet("parti", tuple(r["prompt"] for r in records), f"parti:{path}", "image", groups)


def _hpdv2(path: Path) -> PromptSet:
    _check_exists(path)
    if path.is_dir():
        files = [path / f"{style}.json" for style in HPDV2_STYLES if (path / f"{style}.json").is_file()]
        if not files:
            raise DataError(path, f"no HPDv2 benchmark files: expected {[s + '.json' for s in HPDV2_STYLES]}")
    else:
        files = [path]
    prompts: list[str] = []
    groups: list[str] = []
    for file in files:
        records = load_prompt_records(file)
        prompts += [r["prompt"] for r in records]
        groups += [file.stem] * len(records)
    return PromptSet("hpdv2", tuple(prompts), f"hpdv2:{path}", "image", tuple(groups))


def _vbench(path: Path) -> PromptSet:
    _check_exists(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(path, "no VBench prompt lists (*.txt) in this folder")
        prompts, groups = [], []
        for file in files:
            records = load_prompt_records(file)
            prompts += [r["prompt"] for r in records]
            groups += [file.stem] * len(records)
        return PromptSet("vbench", tuple(prompts), f"vbench:{path}", "video", tuple(groups))
    records = load_prompt_records(path)
    groups: tuple[str, ...] = ()
    if "dimension" in records[0]:
        labels = []
        for i, r in enumerate(records):
            dim = r.get("dimension")
            if isinstance(dim, list):
                dim = dim[0] if dim else ""
            if not isinstance(dim, str):
                raise DataError(
                    path, f"'dimension' must be a string or list of strings, got {dim!r}", where=f"item {i}"
                )
            labels.append(dim)
        groups = tuple(labels)
    return PromptSet("vbench", tuple(r["prompt"] for r in records), f"vbench:{path}", "video", groups)


def _geneval(path: Path) -> PromptSet:
    _check_exists(path)
    records = load_prompt_records(path)
    groups = tuple(str(r.get("tag", "")) for r in records) if "tag" in records[0] else ()
    return PromptSet("geneval", tuple(r["prompt"] for r in records), f"geneval:{path}", "image", groups)


BENCHMARK_LOADERS = {"parti": _parti, "hpdv2": _hpdv2, "vbench": _vbench, "geneval": _geneval}
"""Benchmark prefix -> loader of a local file or folder."""


def load_prompt_set(spec: str | os.PathLike[str] | PromptSet, *, limit: int | None = None) -> PromptSet:
    """Resolve a prompt-set spec (see the module docstring) into a :class:`PromptSet`.

    Args:
        spec: a built-in name, ``<benchmark>:PATH``, a prompt file path, or a PromptSet (returned as is,
            after ``limit``); an ``@N`` suffix keeps N evenly spread prompts.
        limit: keep at most this many prompts, spread evenly (applied after any ``@N``).

    Raises:
        ValueError: an unknown name (listing the built-in sets and benchmark prefixes) or a bad ``@N``.
        DataError: a missing or malformed file, naming the file and the line.
    """
    if isinstance(spec, PromptSet):
        out = spec
    else:
        text = os.fspath(spec)
        count = None
        base, at, tail = text.rpartition("@")
        if at and tail.isdigit() and base:
            text, count = base, int(tail)
        elif at and base and not Path(text).exists():
            raise ValueError(f"prompt set {spec!r}: '@{tail}' must be a positive number of prompts")
        out = _resolve(text)
        if count is not None:
            out = out.take(count)
    if limit is not None and limit < len(out.prompts):
        out = out.take(limit)
    return out


def _resolve(text: str) -> PromptSet:
    if text in BUILTIN_SETS:
        return _builtin(text)
    prefix, colon, rest = text.partition(":")
    if colon and prefix in BENCHMARK_LOADERS:
        return BENCHMARK_LOADERS[prefix](Path(rest))
    path = Path(text)
    if path.suffix.lower() in (".txt", ".jsonl", ".json", ".csv", ".tsv") or path.exists():
        _check_exists(path)
        found, images = load_conditioned_prompts(path)  # an image column: condition images
        prompts = tuple(found)
        kept = tuple(str(image.resolve()) for image in images) if images else ()
        return PromptSet(path.stem, prompts, str(path), None, (), _all_toy(prompts), kept)
    raise ValueError(
        f"unknown prompt set {text!r}: not a built-in set ({', '.join(builtin_prompt_sets())}), "
        f"not <benchmark>:PATH with benchmark in {sorted(BENCHMARK_LOADERS)}, and no such prompt file"
    )


def write_prompt_set(prompt_set: PromptSet, path: str | os.PathLike[str]) -> None:
    """Save a set's prompts (and groups) as jsonl, so a report can be re-run on exactly these prompts."""
    lines = [
        json.dumps(
            {"prompt": p}
            | ({"group": prompt_set.groups[i]} if prompt_set.groups else {})
            | ({"image": prompt_set.images[i]} if prompt_set.images else {})
        )
        for i, p in enumerate(prompt_set.prompts)
    ]
    Path(path).write_text("\n".join(lines) + "\n")
