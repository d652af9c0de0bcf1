"""VAE memory savers: sliced and tiled encode/decode through diffusers' own switches.

- **Slicing** (``enable_slicing``) runs the VAE one sample of the batch at a time: the peak of a
  batch of B drops to that of one sample, and the output is the same (each sample's arithmetic does
  not depend on the others).
- **Tiling** (``enable_tiling``) runs the VAE on overlapping spatial tiles and blends the overlaps
  linearly: the peak no longer grows with the resolution, at the cost of small seams (the output is
  not the plain decode's, except for inputs no larger than one tile, which take the plain path).

Both are switches of the VAE classes the families load (``AutoencoderKL`` for SD3, FLUX.1 and
Z-Image; ``AutoencoderKLWan`` for Wan; ``AutoencoderKLQwenImage``; ``AutoencoderKLFlux2``). A
model without a VAE (the toy family works in pixel space) or with a VAE class lacking the switch is
refused with one error naming the setting.
"""

from __future__ import annotations

from flowalign.models.base import FlowModel

__all__ = ["enable_vae_savers"]


def _switch(model: FlowModel, method: str, key: str) -> None:
    vae = model.pipe.components.get("vae")
    if vae is None:
        raise ValueError(f"{key}: the {model.family} model has no VAE to run {method.split('_')[1]}")
    switch = getattr(vae, method, None)
    if not callable(switch):
        raise ValueError(
            f"{key}: the {model.family} model's VAE ({type(vae).__name__}) has no {method}(); "
            f"turn {key} off for this model"
        )
    switch()


def enable_vae_savers(
    model: FlowModel, *, slicing: bool = False, tiling: bool = False, keys: tuple[str, str] | None = None
) -> FlowModel:
    """Turn on the VAE's sliced (``slicing``) and tiled (``tiling``) encode/decode; returns ``model``.

    ``keys`` names the two settings in error messages (default ``("vae_slicing", "vae_tiling")``).

    Raises:
        ValueError: a switch is on and the model has no VAE or its VAE class lacks the switch.
    """
    slicing_key, tiling_key = keys or ("vae_slicing", "vae_tiling")
    if slicing:
        _switch(model, "enable_slicing", slicing_key)
    if tiling:
        _switch(model, "enable_tiling", tiling_key)
    return model
