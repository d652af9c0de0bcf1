"""Condition images of image-conditioned families (image-to-video, edit), encoded once per row.

A run on Wan I2V or TI2V-5B data carries one condition image per sample (``item["condition"]``). The
step turns it into image fields of the conditioning (:class:`~flowalign.models.base.PromptEmbeds`
``image_latents``: the VAE latents of the image, or of the image followed by empty frames, with the
first-frame mask; ``image_embeds``: Wan 2.1 I2V's CLIP image tokens), which costs a VAE encode (of a
whole zero-padded clip for I2V) and a CLIP forward per sample and step. :func:`cache_condition_images`
computes them once per dataset row with the family's ``encode_images``, for media of the row's own
size, and the run trains on items that carry ``condition/<field>`` tensors instead of the image
(:data:`~flowalign.data.batches.CONDITION_PREFIX`); the batch hands them to the method as
:class:`~flowalign.data.batches.CachedCondition` rows, which
:meth:`~flowalign.training.methods.common.CachedPrompts.condition` stacks next to the cached text.

Each row is encoded alone, as the step's ``encode_prompt(..., images=...)`` encodes its images one by
one through the VAE, so a cached ``image_latents`` row is the per-step one bit for bit; CLIP image
tokens are computed for a batch of one instead of the step's batch (equal up to the rounding of a
batched matmul). The text part comes from the prompt cache: for these families the text embeddings do
not depend on the image (:meth:`~flowalign.models.base.FlowModel.encode_text`).

The fingerprint covers the VAE and the image encoder (class, config, weights, dtype), the family, the
item count and the dataset's identity (:func:`~flowalign.training.latent_cache.data_identity`): a
changed data file or model rebuilds the cache. A latent cache built over these rows names this
fingerprint in its own, so it is rebuilt with them.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from flowalign.data.batches import CONDITION_PREFIX
from flowalign.training.cache import CachedDataset, ensure_cache, fingerprint_module

__all__ = ["ConditionRows", "cache_condition_images", "condition_fingerprint", "media_size_of"]

_MEDIA = ("media_w", "pixels", "latents_w", "latents")


def media_size_of(model: Any, item: dict) -> tuple[int, int, int]:
    """(height, width, num_frames) of the media an item trains on, as the step derives it from the
    latents' shape (``model.media_size(model.latent_shape(...))``)."""
    key = next((k for k in _MEDIA if k in item), None)
    if key is None:
        raise ValueError(
            f"cannot cache condition images: the items have no media field (one of {list(_MEDIA)})"
        )
    shape = tuple(item[key].shape)
    if key.startswith("latents"):
        return model.media_size((1, *shape))
    frames, (height, width) = (shape[0] if len(shape) == 4 else 1), shape[-2:]
    return model.media_size(model.latent_shape(1, height, width, frames))


def condition_fingerprint(model: Any, identity: str, num_items: int) -> str:
    """The cache fingerprint: the VAE and the image encoder, the family, the item count and ``identity``."""
    modules = model.modules()
    parts = [f"family={model.family}", f"items={num_items}", "condition-images", identity]
    if modules.get("image_encoder") is not None:
        parts.append(f"image_encoder={fingerprint_module(modules['image_encoder'])}")
    return fingerprint_module(modules.get("vae"), extra="|".join(parts))


class ConditionRows(Dataset):
    """``base``'s items with their ``condition`` image replaced by the cached ``condition/<field>``
    tensors of the row; keeps ``base``'s ``batch_order`` (aspect-ratio buckets) and ``prompts``."""

    def __init__(self, rows: CachedDataset, base: Dataset, fingerprint: str) -> None:
        self.rows, self.base, self.fingerprint = rows, base, fingerprint
        for name in ("batch_order", "prompts"):
            if getattr(base, name, None) is not None:
                setattr(self, name, getattr(base, name))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = {k: v for k, v in self.base[i].items() if k != "condition"}
        row = self.rows[i]
        item.update({CONDITION_PREFIX + key: row[key] for key in self.rows.keys})
        return item


def cache_condition_images(
    model: Any, dataset: Dataset, cache_dir: str | os.PathLike, *, identity: str
) -> ConditionRows:
    """Encode the condition image of every item of ``dataset`` once with ``model.encode_images`` (or
    open the matching cache in ``cache_dir``) and return the items with the encodings instead.

    Raises:
        ValueError: the items have no ``condition`` image, or the family cannot encode one.
    """
    first = dataset[0]
    if "condition" not in first:
        raise ValueError("cannot cache condition images: the dataset items have no 'condition' image")
    encode_images = getattr(model, "encode_images", None)
    if encode_images is None:
        raise ValueError(f"{model.family} has no condition-image encoder (encode_images) to cache")
    from flowalign.models.wan_condition import check_images

    def encode(items: list[dict]) -> dict[str, Tensor]:
        rows = []
        for item in items:  # one by one: the rows' media sizes may differ (buckets)
            height, width, frames = media_size_of(model, item)
            rows.append(encode_images(check_images([item["condition"]], 1), height, width, frames))
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}

    fingerprint = condition_fingerprint(model, identity, len(dataset))
    rows = ensure_cache(dataset, encode, cache_dir, fingerprint=fingerprint, batch_size=1, collate=list)
    return ConditionRows(rows, dataset, fingerprint)
