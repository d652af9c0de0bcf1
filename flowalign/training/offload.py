"""CPU offload of a run's frozen modules (``train.offload_frozen``).

A frozen module (a full fine-tune's DPO reference copy, f-distill's teacher, text encoders when the
prompts are not cached, the VAE when the latents are not) is kept on the CPU and reaches the device
only for its own forward: accelerate's :func:`accelerate.cpu_offload` keeps the weights in a CPU
state dict, leaves the module's parameters on the ``meta`` device and attaches a hook to every
submodule that owns parameters, which copies that submodule's weights to the execution device for its
forward and drops them after. The device then holds one layer of a frozen module at a time instead of
all of its weights, for one host-to-device copy of the frozen weights per forward (slower steps; pinned
memory is not used, so the copies are synchronous).

The arithmetic is that of the plain run: the same weights, in the same dtype, take part in the same
operations on the execution device; on one device (the CPU) the losses are identical.

Offloaded modules are marked (:data:`OFFLOADED`) and skipped by the loop's device placement; when the
loop ends (:func:`restore_offloaded`) the hooks come off and the weights are real CPU tensors again, so
the final export reads them. Sharded
launches (FSDP2, DeepSpeed) are refused: they place and shard the frozen modules themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from flowalign.models.base import FlowModel
from flowalign.training.distributed import SHARD_FROZEN

__all__ = ["OFFLOADED", "is_offloaded", "offload_frozen_modules", "place_frozen", "restore_offloaded"]

OFFLOADED = "_flowalign_cpu_offloaded"
"""Attribute set on a module whose weights :func:`offload_frozen_modules` keeps on the CPU."""


def is_offloaded(module: nn.Module) -> bool:
    """Whether ``module`` runs under CPU-offload hooks (the loop does not move it)."""
    return getattr(module, OFFLOADED, False)


def offload_frozen_modules(
    frozen: Mapping[str, nn.Module],
    trainable: Mapping[str, nn.Module],
    device: torch.device | str,
    *,
    sharded: bool = False,
) -> list[str]:
    """Keep each module of ``frozen`` on the CPU, its weights streamed to ``device`` per forward.

    A frozen module that shares a parameter with a trainable one (none of the package's methods has
    one) is refused, as are sharded launches. Returns the names of the modules offloaded (already
    offloaded ones included, so a second call is harmless).

    Raises:
        ValueError: ``sharded``, or a frozen module holds a trainable module's parameter.
    """
    from accelerate import cpu_offload

    if sharded:
        raise ValueError(
            "train.offload_frozen works with single-process or DDP runs; FSDP2 and DeepSpeed place and "
            "shard the frozen modules themselves"
        )
    trained = {id(p) for m in trainable.values() for p in m.parameters()}
    names = []
    for name, module in frozen.items():
        names.append(name)
        if is_offloaded(module):
            continue
        if any(id(p) in trained for p in module.parameters()):
            raise ValueError(
                f"train.offload_frozen: frozen module {name!r} shares parameters with a trained one"
            )
        module.eval()
        # the weights leave the device first: cpu_offload copies them into its CPU state dict
        module.to("cpu")
        # buffers stay on the device (small; some are read outside any forward, e.g. a VAE's latent stats)
        cpu_offload(module, execution_device=torch.device(device), offload_buffers=False)
        setattr(module, OFFLOADED, True)
    return names


def place_frozen(
    frozen: Mapping[str, nn.Module],
    trainable: Mapping[str, nn.Module],
    device: torch.device | str,
    *,
    offload: bool,
    sharded: bool = False,
    owner: object = None,
    keep_for_sharding: bool = False,
) -> None:
    """The loop's placement of the frozen modules: each goes to ``device`` in eval mode, or, with
    ``offload`` (``train.offload_frozen``), stays on the CPU under offload hooks
    (:func:`offload_frozen_modules`). A :class:`FlowModel` attribute of ``owner`` (the method) whose
    transformer is offloaded, e.g. f-distill's teacher, computes on ``device``
    (:attr:`FlowModel.execution_device`): its parameters no longer say where that is. With
    ``keep_for_sharding`` (FSDP2) a module marked ``SHARD_FROZEN`` stays where it is: FSDP2 shards it
    there and moves only this process's shard to ``device``."""
    if offload:
        offload_frozen_modules(frozen, trainable, device, sharded=sharded)
        for model in _offloaded_models(owner):
            model.execution_device = torch.device(device)
    for module in frozen.values():
        if not is_offloaded(module) and not (keep_for_sharding and getattr(module, SHARD_FROZEN, False)):
            module.to(device)
        module.eval()


def _offloaded_models(owner: object) -> list[FlowModel]:
    found = [v for v in vars(owner).values() if isinstance(v, FlowModel)] if owner is not None else []
    return [m for m in found if is_offloaded(m.transformer)]


def restore_offloaded(modules: Iterable[nn.Module], owner: object = None) -> None:
    """Take the offload hooks off ``modules`` (those :func:`offload_frozen_modules` attached): their
    weights come back from the CPU state dict into real CPU parameters, so the model can be saved
    and used again as a plain module. Other modules are left alone; the FlowModels of ``owner`` that
    :func:`place_frozen` pointed at the device are pointed back at their transformer."""
    from accelerate.hooks import remove_hook_from_module

    for model in _offloaded_models(owner):
        model.execution_device = None
    for module in modules:
        if is_offloaded(module):
            remove_hook_from_module(module, recurse=True)
            delattr(module, OFFLOADED)
