"""VAE latents of fixed training media, encoded once per dataset and model and reused.

An offline method (DPO, RWR, SFT, latent reward, f-distill's real data) that trains on fixed media
encodes the same pictures or clips through the frozen VAE at every step. :func:`cache_media_latents` encodes every item once into a
:func:`~flowalign.training.cache.build_cache` folder, and the run trains on the cached items:
``media_w``/``media_l`` become ``latents_w``/``latents_l`` and ``pixels`` becomes ``latents``,
which the methods read instead of calling the VAE. The VAE then leaves the device
(:func:`offload_vae`) and the loop no longer places it.

Each item is encoded on its own batch row as the step would encode it (the latent distribution's
mode, kept in the VAE output dtype, at least fp32), so a cached item equals the per-step encoding
up to the rounding of a batched convolution. Prompts and other plain fields are stored with the
latents (the media files are not read again), and so are str-keyed dicts of them (a pair's labels);
other tensors (RWR's weights, cached condition encodings) are stored as they are.

The cache fingerprint covers the VAE (class, config, weights and dtype), the family, the item
count and the dataset's identity (:func:`data_identity`: the data file's path, size and
modification time, and the settings that change the items, e.g. buckets). A run on the same data
and model, or a resume, reuses the folder; any change rebuilds it. Media files edited in place
without touching the data file are not detected: delete the cache folder then.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from flowalign.training.cache import CachedDataset, ensure_cache, fingerprint_module

__all__ = [
    "MEDIA_KEYS",
    "CachedLatents",
    "cache_media_latents",
    "cache_run_latents",
    "data_identity",
    "offload_vae",
]

MEDIA_KEYS = {"media_w": "latents_w", "media_l": "latents_l", "pixels": "latents"}
"""Item field with media in [0, 1] -> the field its cached latents take."""

_PLAIN = (str, int, float, bool, type(None))


def _is_plain(value: Any) -> bool:
    """A value the cache index keeps as JSON: a str, number, bool or None, or a str-keyed dict of
    them (the per-dimension labels of a preference pair)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and isinstance(v, _PLAIN) for k, v in value.items())
    return isinstance(value, _PLAIN)


def data_identity(path: str | os.PathLike, *settings: Any) -> str:
    """sha256 of a data file's (or every file of a data folder's) resolved path, size and mtime, and of
    ``settings`` (their reprs): what the cache of its latents depends on besides the model."""
    path = Path(path)
    digest = hashlib.sha256(repr(settings).encode())
    if not path.exists():  # a generated dataset (``toy:...``) or a hub id: the spec and settings say it all
        digest.update(f"spec={path}".encode())
        return digest.hexdigest()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        stat = file.stat()
        digest.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class CachedLatents(Dataset):
    """A dataset's items with their media replaced by cached latents (see the module docstring).

    Keeps the wrapped dataset's ``batch_order`` (aspect-ratio buckets), so global batches are
    drawn from one bucket as before.
    """

    def __init__(self, rows: CachedDataset, base: Dataset) -> None:
        self.rows = rows
        order = getattr(base, "batch_order", None)
        if order is not None:
            self.batch_order = order

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _vae_device(model: Any) -> torch.device:
    vae = model.modules().get("vae")
    return next(vae.parameters()).device if vae is not None else model.device


def cache_media_latents(
    model: Any,
    dataset: Dataset,
    cache_dir: str | os.PathLike,
    *,
    identity: str,
    batch_size: int = 8,
) -> CachedLatents:
    """Encode the media fields (:data:`MEDIA_KEYS`) of every item of ``dataset`` with ``model``'s VAE
    once (or open the matching cache in ``cache_dir``) and return the dataset of cached items.

    ``identity`` names the dataset and its settings (:func:`data_identity`). Items of a bucketed
    dataset (its own ``batch_order``), whose sizes differ, are encoded one at a time.

    Raises:
        ValueError: the items have no media field.
    """
    first = dataset[0]
    media = [key for key in MEDIA_KEYS if key in first]
    if not media:
        raise ValueError(
            f"cannot cache latents: dataset items have no media field (one of {sorted(MEDIA_KEYS)})"
        )
    keep = [k for k, v in first.items() if k != "index" and k not in media and _is_plain(v)]
    tensors = [k for k, v in first.items() if k not in media and isinstance(v, Tensor)]
    other = sorted(set(first) - set(media) - set(keep) - set(tensors) - {"index"})
    if other:
        raise ValueError(
            f"cannot cache latents: item field {other[0]!r} is neither a tensor nor a plain value"
        )
    device = _vae_device(model)

    def encode(batch: dict) -> dict[str, Tensor]:
        out = {MEDIA_KEYS[key]: model.encode_media(batch[key].to(device)) for key in media}
        out.update({key: batch[key] for key in tensors})
        return out

    vae = model.modules().get("vae")
    extra = "|".join(
        [f"family={model.family}", f"items={len(dataset)}", f"media={media}", f"tensors={tensors}", identity]
    )
    if getattr(vae, "use_tiling", False):  # tiled encoding blends tiles: other latents than the plain path
        extra += "|vae_tiling"
    fingerprint = fingerprint_module(vae, extra=extra)
    if getattr(dataset, "batch_order", None) is not None:
        batch_size = 1  # bucketed items differ in size: one per encode call
    rows = ensure_cache(
        dataset, encode, cache_dir, fingerprint=fingerprint, batch_size=batch_size, keep_keys=keep
    )
    return CachedLatents(rows, dataset)


def offload_vae(method: Any) -> None:
    """After caching: the VAE of ``method.model`` goes to the CPU and out of the method's frozen modules
    (``media_cached``), so the loop no longer puts it on the device."""
    vae = method.model.modules().get("vae")
    if vae is not None:
        vae.to("cpu")
    method.media_cached = True


def cache_run_latents(run: Any, method: Any, data: Dataset, *settings: Any) -> Dataset:
    """A run's data with its media latents cached when ``run.cache_latents`` (else ``data`` itself), in
    ``run.latent_cache_dir`` (default ``<output_dir>/cache/latents``; the main process builds it, the
    others then open it), and the VAE off the device. ``settings``: what else changes the items (the
    method's name, buckets, ...), part of the dataset's identity with ``run.data``."""
    from accelerate import PartialState

    if not run.cache_latents:
        return data
    train = run.train
    folder = run.latent_cache_dir or Path(train.output_dir) / "cache" / "latents"
    with PartialState(cpu=train.cpu).main_process_first():
        cached = cache_media_latents(method.model, data, folder, identity=data_identity(run.data, *settings))
    offload_vae(method)
    return cached
