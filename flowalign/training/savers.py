"""The VAE savers of a run (``train.vae_slicing``, ``train.vae_tiling``) on whatever flow model its
method holds: the trained model of DPO, RWR, SFT or GRPO, the teacher of f-distill and DI*."""

from __future__ import annotations

from flowalign.config import TrainConfig
from flowalign.models.base import FlowModel
from flowalign.models.vae_savers import enable_vae_savers

__all__ = ["enable_run_vae_savers"]

KEYS = ("train.vae_slicing", "train.vae_tiling")


def enable_run_vae_savers(method: object, cfg: TrainConfig) -> None:
    """Turn on the configured VAE savers on every :class:`FlowModel` attribute of ``method``.

    Raises:
        ValueError: a saver is on and the method holds no flow model (reward models, the video
            tokenizer), or the model has no VAE with the switch; the message names the key.
    """
    if not (cfg.vae_slicing or cfg.vae_tiling):
        return
    models = [v for v in getattr(method, "__dict__", {}).values() if isinstance(v, FlowModel)]
    if not models:
        key = KEYS[0] if cfg.vae_slicing else KEYS[1]
        raise ValueError(f"{key}: this run ({type(method).__name__}) trains no flow model with a VAE")
    for model in models:
        enable_vae_savers(model, slicing=cfg.vae_slicing, tiling=cfg.vae_tiling, keys=KEYS)
