"""Activation (gradient) checkpointing for any trainable module.

``train.gradient_checkpointing`` recomputes activations in the backward pass instead of keeping
them: memory for activations drops from every layer's to about one block's, for one extra forward.
:func:`enable_gradient_checkpointing` picks, per module:

1. the module's own switch: diffusers models that support it (``enable_gradient_checkpointing``)
   and the package's own modules with that method;
2. transformers models (``activation_checkpointing_enable`` or, in older releases,
   ``gradient_checkpointing_enable``; non-reentrant), e.g. a text encoder trained by SFT, and
   open_clip / timm towers (``set_grad_checkpointing``), e.g. a reward model's CLIP;
3. otherwise block-wise checkpointing: every element of each ``nn.ModuleList``/``nn.ModuleDict``
   found below the module (not inside a submodule handled by 1 or 2) runs under
   ``torch.utils.checkpoint`` (non-reentrant) while gradients are on and the module trains. This
   covers f-distill's discriminator heads, the latent reward's trunk blocks and heads, reward-model
   heads. Parameter names and state dicts do not change. A block whose parameters are all frozen
   at call time (the discriminator inside the generator's step) runs without checkpointing.

A module with none of these (no container of blocks) is refused with one error naming it.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["enable_gradient_checkpointing"]


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    plain = self._flowalign_plain_forward
    # a block frozen for this call (e.g. the discriminator during the generator's step) runs plainly:
    # the recomputation in backward, after the block is trainable again, would save other tensors
    if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
        return checkpoint(plain, *args, use_reentrant=False, **kwargs)
    return plain(*args, **kwargs)


def _checkpoint_block(block: nn.Module) -> bool:
    if not any(p.requires_grad for p in block.parameters()) or hasattr(block, "_flowalign_plain_forward"):
        return False
    block._flowalign_plain_forward = block.forward
    block.forward = types.MethodType(_checkpointed_forward, block)
    return True


def _native(module: nn.Module) -> bool:
    """Use the module's own switch when it has one; True when it did."""
    if getattr(module, "_supports_gradient_checkpointing", True) and callable(
        getattr(module, "enable_gradient_checkpointing", None)
    ):
        module.enable_gradient_checkpointing()
        return True
    if getattr(module, "supports_gradient_checkpointing", False):
        if callable(getattr(module, "activation_checkpointing_enable", None)):  # transformers >= 5.x
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            return True
        if callable(getattr(module, "gradient_checkpointing_enable", None)):
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return True
    if callable(getattr(module, "set_grad_checkpointing", None)):  # open_clip / timm towers
        module.set_grad_checkpointing(True)
        return True
    return False


def _blockwise(module: nn.Module) -> int:
    """Checkpoint the blocks below ``module``; the number of blocks wrapped."""
    count = 0
    for child in module.children():
        if _native(child):
            count += 1
        elif isinstance(child, nn.ModuleList | nn.ModuleDict):
            for block in child.children():  # a container inside a container is searched again
                is_container = isinstance(block, nn.ModuleList | nn.ModuleDict)
                count += _blockwise(nn.ModuleList([block])) if is_container else _checkpoint_block(block)
        else:
            count += _blockwise(child)
    return count


def enable_gradient_checkpointing(module: nn.Module, name: str) -> str:
    """Turn on activation checkpointing for trainable module ``name``; returns how: "native" or
    "blocks (N)".

    Raises:
        ValueError: the module has no switch of its own and no block containers to checkpoint.
    """
    if _native(module):
        return "native"
    count = _blockwise(module)
    if count == 0:
        raise ValueError(
            f"train.gradient_checkpointing: trainable module {name!r} ({type(module).__name__}) has no "
            "enable_gradient_checkpointing() and no ModuleList/ModuleDict of trainable blocks to checkpoint"
        )
    return f"blocks ({count})"
