"""Cache per-item tensors (VAE latents, prompt embeddings) in safetensors shards, and read them back.

Encoding media and prompts with frozen networks on every step wastes most of a training step;
the cache runs the encoders once::

    fp = fingerprint_module(vae, extra="512px")
    data = ensure_cache(dataset, encode, "cache/latents", fingerprint=fp, keep_keys=["prompt"])
    data[0]  # {"index": 0, "latents": Tensor[C, h, w], "prompt": "..."}

Layout of ``cache_dir``::

    index.json              format, fingerprint, item count, tensor keys, shards (+ size, sha256), kept fields
    shard-00000.safetensors tensors of items [0, shard_size) under keys "<item>/<key>"
    ...

The fingerprint identifies the encoder (class, config, weights) and anything else that changes
the output (resolution, dtype): :func:`ensure_cache` rebuilds a cache whose fingerprint or item
count differs, and :class:`CachedDataset` refuses one whose fingerprint is not the expected one.
Caches are written to a temporary folder and renamed into place, so a half-built cache is never
read. Build it on one process (e.g. inside ``accelerator.main_process_first()``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from flowalign.files import match_umask, sha256_file
from flowalign.formats import read_tagged_json

__all__ = [
    "CacheError",
    "CachedDataset",
    "StaleCacheError",
    "build_cache",
    "cache_is_valid",
    "ensure_cache",
    "fingerprint_module",
]

CACHE_FORMAT = "flowalign-cache"
CACHE_VERSION = 1
INDEX = "index.json"


class CacheError(ValueError):
    """A cache folder is missing, incomplete or unreadable."""


class StaleCacheError(CacheError):
    """A cache was built with a different encoder/settings fingerprint than the one expected."""


def fingerprint_module(module: nn.Module | None = None, *, extra: str = "") -> str:
    """sha256 of a module's class, config and weights (names, dtypes, shapes, bytes), plus ``extra``.

    Two encoders with the same fingerprint produce the same outputs; change ``extra`` for any
    other setting that changes them (resolution, scaling factor, dtype, max prompt length).
    """
    digest = hashlib.sha256()
    digest.update(f"extra={extra}\n".encode())
    if module is not None:
        digest.update(f"class={type(module).__module__}.{type(module).__qualname__}\n".encode())
        config = getattr(module, "config", None)
        if config is not None:
            as_dict = dict(config) if isinstance(config, dict) else getattr(config, "to_dict", lambda: {})()
            digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
        for name, tensor in module.state_dict().items():
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _read_index(cache_dir: Path) -> dict:
    return read_tagged_json(
        cache_dir / INDEX,
        CACHE_FORMAT,
        error=CacheError,
        missing="missing (no cache here, or it was never completed)",
    )


def build_cache(
    dataset: Dataset,
    encode: Callable[[dict], dict[str, Tensor]],
    cache_dir: str | os.PathLike,
    *,
    fingerprint: str,
    batch_size: int = 8,
    shard_size: int = 1024,
    keep_keys: Sequence[str] = (),
    collate: Callable[[list[dict]], dict] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Encode every item of ``dataset`` once and write the cache (replacing any old one atomically).

    Args:
        dataset: map-style dataset of dict items, read in index order.
        encode: collated batch -> {key: Tensor [B, ...]}, run under ``torch.no_grad``.
        cache_dir: destination folder.
        fingerprint: identity of the encoder and settings (see :func:`fingerprint_module`).
        batch_size: items per ``encode`` call.
        shard_size: items per safetensors shard.
        keep_keys: JSON-serialisable item fields copied as-is (e.g. "prompt"), returned by the dataset.
        collate: list of items -> batch (default ``torch.utils.data.default_collate``).
        dtype: cast floating tensors to this dtype before storing (e.g. torch.bfloat16); None keeps them.

    Returns:
        ``cache_dir``.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    cache_dir = Path(cache_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir.with_name(f"{cache_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    collate = collate or torch.utils.data.default_collate
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot cache an empty dataset")
    keys: list[str] | None = None
    meta: dict[str, list[Any]] = {k: [] for k in keep_keys}
    shards: list[dict] = []
    pending: dict[str, Tensor] = {}
    shard_start = 0

    def flush(stop: int) -> None:
        nonlocal pending, shard_start
        path = tmp / f"shard-{len(shards):05d}.safetensors"
        save_file(pending, str(path))
        shards.append(
            {
                "file": path.name,
                "start": shard_start,
                "stop": stop,
                "size": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
        pending, shard_start = {}, stop

    try:
        for start in range(0, n, batch_size):
            items = []
            for i in range(start, min(start + batch_size, n)):
                item = dataset[i]
                if not isinstance(item, dict):
                    raise CacheError(f"dataset item {i} is a {type(item).__name__}, expected a dict")
                for k in keep_keys:
                    if k not in item:
                        raise CacheError(f"dataset item {i} has no key {k!r} (keep_keys={list(keep_keys)})")
                    meta[k].append(item[k])
                items.append(item)
            with torch.no_grad():
                out = encode(collate(items))
            if keys is None:
                keys = sorted(out)
            if sorted(out) != keys:
                raise CacheError(f"encode returned keys {sorted(out)} for items {start}.., earlier {keys}")
            for key, value in out.items():
                if not isinstance(value, Tensor) or value.ndim == 0 or value.shape[0] != len(items):
                    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise CacheError(
                        f"encode output {key!r} must be a Tensor [B={len(items)}, ...], got {shape}"
                    )
            for j in range(len(items)):
                i = start + j
                for key, value in out.items():
                    t = value[j].detach().to("cpu")
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    pending[f"{i}/{key}"] = t.clone().contiguous()
                if (i + 1) % shard_size == 0:
                    flush(i + 1)
        if pending:
            flush(n)
        index = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "fingerprint": fingerprint,
            "num_items": n,
            "keys": keys,
            "shard_size": shard_size,
            "shards": shards,
            "meta": meta,
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=1, default=str), encoding="utf-8")
        if cache_dir.exists():
            trash = cache_dir.with_name(f"{cache_dir.name}.del-{os.getpid()}")
            os.replace(cache_dir, trash)
            shutil.rmtree(trash, ignore_errors=True)
        match_umask(tmp)  # safetensors writes 0600
        os.replace(tmp, cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cache_dir


def cache_is_valid(cache_dir: str | os.PathLike, *, fingerprint: str, num_items: int | None = None) -> bool:
    """Whether ``cache_dir`` holds a complete cache with this fingerprint (and item count, if given)."""
    cache_dir = Path(cache_dir)
    try:
        index = _read_index(cache_dir)
    except CacheError:
        return False
    if index.get("fingerprint") != fingerprint or (
        num_items is not None and index.get("num_items") != num_items
    ):
        return False
    for shard in index.get("shards", []):
        path = cache_dir / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["size"]:
            return False
    return True


def ensure_cache(
    dataset: Dataset,
    encode: Callable[[dict], dict[str, Tensor]],
    cache_dir: str | os.PathLike,
    *,
    fingerprint: str,
    **build_kwargs: Any,
) -> CachedDataset:
    """Open the cache at ``cache_dir`` if it matches ``fingerprint`` and ``len(dataset)``; else (re)build it.

    ``build_kwargs`` go to :func:`build_cache`.
    """
    if not cache_is_valid(cache_dir, fingerprint=fingerprint, num_items=len(dataset)):
        build_cache(dataset, encode, cache_dir, fingerprint=fingerprint, **build_kwargs)
    return CachedDataset(cache_dir, fingerprint=fingerprint)


class CachedDataset(Dataset):
    """Map-style dataset over a cache: item i -> ``{"index": i, <tensor keys>..., <kept keys>...}``.

    Args:
        cache_dir: a folder written by :func:`build_cache`.
        fingerprint: if given, the cache must have been built with exactly this fingerprint.
        verify: check every shard's sha256 on open (reads the whole cache once).

    Raises:
        StaleCacheError: the fingerprint differs. CacheError: missing or damaged files.
    """

    def __init__(
        self, cache_dir: str | os.PathLike, *, fingerprint: str | None = None, verify: bool = False
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.index = _read_index(self.cache_dir)
        if fingerprint is not None and self.index.get("fingerprint") != fingerprint:
            raise StaleCacheError(
                f"{self.cache_dir}: cache was built with fingerprint {str(self.index.get('fingerprint'))[:16]}..., "
                f"expected {fingerprint[:16]}... (encoder or settings changed; rebuild it with ensure_cache)"
            )
        self.keys: list[str] = list(self.index["keys"])
        self.meta: dict[str, list[Any]] = self.index.get("meta", {})
        self._shards: list[dict] = self.index["shards"]
        for shard in self._shards:
            path = self.cache_dir / shard["file"]
            if not path.is_file():
                raise CacheError(f"{path}: cache shard missing")
            if path.stat().st_size != shard["size"]:
                raise CacheError(
                    f"{path}: size {path.stat().st_size} bytes, the index says {shard['size']} (truncated?)"
                )
            if verify and sha256_file(path) != shard["sha256"]:
                raise CacheError(f"{path}: sha256 does not match the cache index (corrupted)")
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.index["num_items"])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # safetensors handles are per process (DataLoader workers reopen them)
        return state

    def _shard_of(self, i: int) -> int:
        size = int(self.index["shard_size"])
        return i // size

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a cache of {len(self)} items ({self.cache_dir})")
        s = self._shard_of(i)
        path = self.cache_dir / self._shards[s]["file"]
        try:
            if s not in self._handles:
                self._handles[s] = safe_open(str(path), framework="pt", device="cpu")
            item: dict[str, Any] = {"index": i}
            for key in self.keys:
                item[key] = self._handles[s].get_tensor(f"{i}/{key}")
        except (SafetensorError, OSError) as err:
            raise CacheError(f"{path}: cannot read item {i}: {err}") from None
        for key, values in self.meta.items():
            item[key] = values[i]
        return item


# ---------------------------------------------------------------------------------------------
# Prompt embeddings of a training set


class _Prompts(Dataset):
    def __init__(self, prompts: list[str]) -> None:
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.prompts[i]}


def text_encoder_names(model: Any) -> list[str]:
    """The pipeline components of a FlowModel that encode prompts (``text_encoder``, ``text_encoder_2``, ...)."""
    return sorted(name for name in model.modules() if name.startswith("text_encoder"))


class PromptEmbedCache:
    """Prompt embeddings of a fixed prompt set, encoded once by the frozen text encoders and reused.

    A training step then reads its prompts' rows instead of running every text encoder (twice per
    pair for DPO), and the text encoders can leave the device. Rows are kept in memory
    (``cache_dir=None``) or in a :func:`build_cache` folder whose fingerprint covers the text
    encoders' weights, the family, the maximum prompt length and the sorted prompt set, so a run
    that resumes, or a second run on the same data and model, reuses it. Rows keep the text
    encoders' dtype, so a cached row equals the per-step encoding of the same prompt.
    """

    def __init__(self, prompts: list[str], rows: Dataset | dict[str, Tensor]) -> None:
        self.prompts = prompts
        self.position = {p: i for i, p in enumerate(prompts)}
        self._rows = rows

    @classmethod
    def build(
        cls,
        model: Any,
        prompts: Sequence[str],
        *,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 8,
    ) -> PromptEmbedCache:
        """Encode the distinct ``prompts`` with ``model.encode_prompt`` (or open a matching cache)."""
        unique = sorted(set(prompts))
        if not unique:
            raise ValueError("cannot cache the embeddings of an empty prompt list")

        def encode(batch: dict) -> dict[str, Tensor]:
            texts = list(batch["prompt"])
            encode_text = getattr(model, "encode_text", None)  # image families: the text part alone
            cond = encode_text(texts) if encode_text is not None else model.encode_prompt(texts)[0]
            out = {name: getattr(cond, name) for name in cond._BATCHED if getattr(cond, name) is not None}
            if cond.text_ids is not None:  # shared by the batch: stored with every row
                out["text_ids"] = cond.text_ids.unsqueeze(0).expand(len(cond), *cond.text_ids.shape)
            return out

        data = _Prompts(unique)
        if cache_dir is None:
            parts: dict[str, list[Tensor]] = {}
            with torch.no_grad():
                for start in range(0, len(unique), batch_size):
                    for key, value in encode({"prompt": unique[start : start + batch_size]}).items():
                        parts.setdefault(key, []).append(value.detach().to("cpu"))
            return cls(unique, {key: torch.cat(values) for key, values in parts.items()})
        encoders = text_encoder_names(model)
        digest = hashlib.sha256("\n".join(unique).encode()).hexdigest()
        extra = "|".join(
            [f"family={model.family}", f"max_len={getattr(model, 'max_sequence_length', None)}", digest]
            + [f"{name}={fingerprint_module(model.modules()[name])}" for name in encoders]
        )
        fingerprint = fingerprint_module(extra=extra)
        rows = ensure_cache(
            data, encode, cache_dir, fingerprint=fingerprint, batch_size=batch_size, collate=_collate_prompts
        )
        return cls(unique, rows)

    def __len__(self) -> int:
        return len(self.prompts)

    def lookup(self, prompts: Sequence[str], device: torch.device | str | None = None) -> Any:
        """The :class:`~flowalign.models.base.PromptEmbeds` of ``prompts`` (a batch, repeats allowed)."""
        from flowalign.models.base import PromptEmbeds

        missing = [p for p in prompts if p not in self.position]
        if missing:
            raise ValueError(f"prompt {missing[0]!r:.80} is not in the prompt cache ({len(self)} prompts)")
        idx = [self.position[p] for p in prompts]
        if isinstance(self._rows, dict):
            table = {key: value[idx] for key, value in self._rows.items()}
        else:
            items = [self._rows[i] for i in idx]
            table = {key: torch.stack([item[key] for item in items]) for key in self._rows.keys}
        text_ids = table.get("text_ids")
        batched = {name: table.get(name) for name in PromptEmbeds._BATCHED}
        return PromptEmbeds(text_ids=None if text_ids is None else text_ids[0], **batched).to(device=device)


def _collate_prompts(items: list[dict]) -> dict:
    return {"prompt": [item["prompt"] for item in items]}
