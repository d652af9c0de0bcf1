"""Function-preserving widening of a transformer (a wider one-step student initialised from its teacher).

Every hidden unit of width d is copied ``factor`` times (d -> f d, attention heads -> f x heads of the
same head size). With the copies identical, the wider network computes exactly what the narrow one does:

- a tensor's output axis of size f d is the f-fold copy of the old one (per d-sized chunk, so the
  [shift, scale, gate, ...] chunks of an adaLN projection stay in their places);
- a Linear / conv weight's input axis of size f d is W / f per copy, so W' [h; h; ...] = W h;
- LayerNorm of [h; h; ...] has the mean and variance of h, and attention over copied heads returns copies.

Symmetry breaking: the input-axis copies get W / f + e_i with sum_i e_i = 0 (e_i ~ N(0, (noise * std W)^2)),
which keeps the output exact (the copies they read are equal) but makes the copies' gradients differ, so
the copies can drift apart in training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["WIDTH_KEYS", "widen_transformer"]

WIDTH_KEYS: dict[str, tuple[str, ...]] = {
    "SD3Transformer2DModel": ("num_attention_heads", "caption_projection_dim"),
}
"""Config entries scaled by the widening factor, per transformer class."""


def _copy_axis(x: Tensor, axis: int, old_d: int, factor: int) -> Tensor:
    """f-fold copy of each d-sized chunk of ``axis``: [c1, c2, ...] -> [c1 x f, c2 x f, ...]."""
    size = x.shape[axis]
    chunks = x.reshape(*x.shape[:axis], size // old_d, old_d, *x.shape[axis + 1 :])
    return torch.cat([chunks] * factor, dim=axis + 1).reshape(
        *x.shape[:axis], size * factor, *x.shape[axis + 1 :]
    )


def _split_axis(x: Tensor, axis: int, old_d: int, factor: int, noise: float, gen: torch.Generator) -> Tensor:
    """W / f per copy along the input ``axis``, plus zero-sum noise across the copies."""
    size = x.shape[axis]
    chunks = x.reshape(*x.shape[:axis], size // old_d, 1, old_d, *x.shape[axis + 1 :]) / factor
    copies = chunks.expand(*chunks.shape[: axis + 1], factor, *chunks.shape[axis + 2 :]).clone()
    if noise > 0 and factor > 1:
        e = torch.randn(copies.shape, generator=gen, dtype=torch.float64).to(copies.dtype)
        e = (e - e.mean(dim=axis + 1, keepdim=True)) * (noise * float(x.double().std()) / factor)
        copies = copies + e
    return copies.reshape(*x.shape[:axis], size * factor, *x.shape[axis + 1 :])


def _widen_tensor(
    name: str, old: Tensor, new_shape: torch.Size, old_d: int, factor: int, noise: float, gen: torch.Generator
) -> Tensor:
    out = old
    for axis, (a, b) in enumerate(zip(old.shape, new_shape, strict=True)):
        if a == b:
            continue
        if b != a * factor or a % old_d:
            raise ValueError(
                f"widen_transformer: {name} axis {axis} goes {a} -> {b}, not a {factor}x copy of {old_d}"
            )
        is_input = axis == 1 and old.dim() in (2, 4)
        out = (
            _split_axis(out, axis, old_d, factor, noise, gen)
            if is_input
            else _copy_axis(out, axis, old_d, factor)
        )
    return out


@torch.no_grad()
def widen_transformer(
    transformer: nn.Module, factor: int = 2, *, noise: float = 1e-2, seed: int = 0
) -> nn.Module:
    """A ``factor`` x wider copy of ``transformer`` computing the same function (module docstring).

    Args:
        transformer: a diffusers transformer of a class in :data:`WIDTH_KEYS`.
        factor: width multiplier (1 returns a plain copy).
        noise: symmetry-breaking scale, relative to each weight's std (0: exact copies, which then
            receive equal updates forever).
        seed: seed of that noise.

    Returns:
        the new transformer (same class and dtype, config with the widened entries).

    Raises:
        ValueError: an unsupported class, factor < 1, or a tensor whose shape is not a widened copy.
    """
    cls = type(transformer).__name__
    if cls not in WIDTH_KEYS:
        raise ValueError(f"widen_transformer: {cls} is not supported (supported: {sorted(WIDTH_KEYS)})")
    if factor < 1:
        raise ValueError(f"widen_transformer: factor must be >= 1, got {factor}")
    config = dict(transformer.config)
    old_d = config["num_attention_heads"] * config["attention_head_dim"]
    for key in WIDTH_KEYS[cls]:
        config[key] = config[key] * factor
    dtype = next(transformer.parameters()).dtype
    wide = type(transformer).from_config(config).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    old_state = transformer.state_dict()
    new_state = wide.state_dict()
    if set(old_state) != set(new_state):
        raise ValueError(f"widen_transformer: {cls} changes its tensor names when widened")
    wide.load_state_dict(
        {k: _widen_tensor(k, v, new_state[k].shape, old_d, factor, noise, gen) for k, v in old_state.items()}
    )
    for (name, buf), (_, new_buf) in zip(transformer.named_buffers(), wide.named_buffers(), strict=True):
        if name not in old_state:  # non-persistent buffers (e.g. a sin-cos table) copied the same way
            new_buf.copy_(_widen_tensor(name, buf, new_buf.shape, old_d, factor, 0.0, gen))
    return wide.train(transformer.training)
