"""DeepSpeed ZeRO for the training loop: one engine per optimizer group.

A DeepSpeed engine owns one module and one optimizer: it divides the loss by the accumulation steps,
reduces (ZeRO-2: reduce-scatters) the gradients of the optimizer's parameters at the accumulation
boundary, clips them by their global norm and steps. A method with several networks and optimizer
groups (f-distill, Diff-Instruct*: the generator, and the critic of fake score and discriminator heads)
therefore gets one engine per group, each built by ``Accelerator.prepare(module, optimizer)`` with the
DeepSpeed config of the launch (batch, accumulation and clipping taken from the run config):

- a group whose parameters lie in one trainable module: the engine wraps that module, and the method
  calls the engine (its forward runs the module);
- a group spanning several modules (f-distill's critic): the engine wraps a container holding them,
  and the method calls each module itself. ZeRO-2 needs no forward hook (its gradient hooks sit on the
  parameters), so the modules run as they are; under ZeRO-3 the engine's parameter-gathering hooks
  sit on every submodule of the container, so calling one of them directly gathers its weights too.

The loop backpropagates each group's loss through that group's engine (:func:`engine_for`) and reads
the clipped gradient norm from it. A module may hold parameters of one group only: two engines cannot
share a module. Methods keep the networks of other groups out of a group's backward (they run them
with frozen parameters or under ``no_grad``), so an engine never sees a gradient outside its own
group's backward.

DeepSpeed broadcasts every parameter from rank 0 when it builds an engine, viewing it as bytes, which
fails for 0-d tensors (CLIP's frozen ``logit_scale``); such a frozen parameter is given shape ``[1]``
while the engine is built and its shape back afterwards. A trainable 0-d parameter is refused.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["configure_deepspeed", "engine_for", "gathered_state_dict", "prepare_deepspeed"]

logger = logging.getLogger(__name__)

_ENGINE = "_flowalign_engine"
"""Attribute on an accelerate-prepared DeepSpeed optimizer: the engine wrapper of its group."""


class Networks(nn.Module):
    """The modules of one optimizer group under one DeepSpeed engine (never called itself)."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleDict(dict(modules))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("call the group's modules, not their DeepSpeed container")


def _owners(params: list[nn.Parameter], modules: Mapping[str, nn.Module]) -> list[str]:
    ids = {id(p) for p in params}
    return [name for name, module in modules.items() if any(id(p) in ids for p in module.parameters())]


def check_partition(trainable: Mapping[str, nn.Module], groups: Mapping[str, list[nn.Parameter]]) -> dict:
    """``{group: [module names]}``, refusing a module that holds parameters of several groups (two
    DeepSpeed engines cannot share a module)."""
    owners = {g: _owners(ps, trainable) for g, ps in groups.items()}
    for name in trainable:
        held = [g for g, names in owners.items() if name in names]
        if len(held) > 1:
            raise ValueError(
                f"DeepSpeed builds one engine per optimizer group over whole modules: trainable module "
                f"{name!r} holds parameters of groups {held}; put each module in one group, or use FSDP2"
            )
    return owners


@contextlib.contextmanager
def _scalars_as_vectors(module: nn.Module) -> Iterator[None]:
    """Frozen 0-d parameters of ``module`` with shape ``[1]`` inside the block (DeepSpeed's broadcast
    at engine start views each parameter as bytes, which a 0-d tensor refuses)."""
    scalars = [(n, p) for n, p in module.named_parameters() if p.ndim == 0]
    trainable = [n for n, p in scalars if p.requires_grad]
    if trainable:
        raise ValueError(
            f"DeepSpeed cannot start an engine with the trainable 0-d parameters {trainable}: freeze them, "
            "store them with shape [1], or use DDP"
        )
    for _, p in scalars:
        p.data = p.data.reshape(1)
    try:
        yield
    finally:
        for _, p in scalars:
            if hasattr(p, "ds_shape"):  # partitioned by ZeRO-3: gathered to this shape from now on
                p.ds_shape = torch.Size(())
            else:
                p.data = p.data.reshape(())


def configure_deepspeed(acc: Any, cfg: Any) -> None:
    """Set the DeepSpeed config's batch, accumulation and clipping values from the run config, the one
    source of them (a differing value from the accelerate or DeepSpeed config file is replaced, with
    a warning)."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.batch_size * cfg.grad_accum_steps * acc.num_processes,
        "gradient_clipping": float(cfg.grad_clip) if cfg.grad_clip is not None else 0.0,
    }
    for key, value in wanted.items():
        old = ds.get(key, "auto")
        if old != "auto" and float(old) != float(value):
            logger.warning("DeepSpeed config %s=%s replaced by the run config's %s", key, old, value)
        ds[key] = value
    acc.gradient_accumulation_steps = cfg.grad_accum_steps


def prepare_deepspeed(
    acc: Any,
    cfg: Any,
    trainable: Mapping[str, nn.Module],
    groups: Mapping[str, list[nn.Parameter]],
    make_optimizer: Callable[[str, list[nn.Parameter]], torch.optim.Optimizer],
) -> tuple[dict[str, nn.Module], dict[str, Any], dict[str, torch.optim.Optimizer], dict[str, list]]:
    """One DeepSpeed engine per optimizer group (see the module docstring).

    Returns (what the method calls for each trainable module: its engine, or the module itself in a
    group of several; the accelerate-prepared optimizers, each knowing its engine; the torch optimizers
    inside the engines; the parameter groups, unchanged: ZeRO-2 keeps the module's parameters).
    """
    owners = check_partition(trainable, groups)  # a bad grouping is refused before DeepSpeed is needed
    from accelerate.utils import DeepSpeedEngineWrapper  # exported only where deepspeed is installed

    configure_deepspeed(acc, cfg)
    wrapped: dict[str, nn.Module] = {}
    prepared: dict[str, Any] = {}
    base: dict[str, torch.optim.Optimizer] = {}
    for g, params in groups.items():
        names = owners[g]
        module = trainable[names[0]] if len(names) == 1 else Networks({n: trainable[n] for n in names})
        raw = make_optimizer(g, list(params))
        # accelerate keeps one engine for its own backward(); each group's is kept on its optimizer
        acc.deepspeed_engine_wrapped = None
        with _scalars_as_vectors(module):
            engine, opt = acc.prepare(module, raw)
        setattr(opt, _ENGINE, DeepSpeedEngineWrapper(engine))
        prepared[g], base[g] = opt, raw
        for n in names:
            wrapped[n] = engine if len(names) == 1 else trainable[n]
    return wrapped, prepared, base, {g: list(ps) for g, ps in groups.items()}


def engine_for(optimizer: Any) -> Any:
    """The engine wrapper (``backward(loss, sync_gradients=...)``, ``get_global_grad_norm()``) of the
    group whose prepared optimizer is ``optimizer``."""
    engine = getattr(optimizer, _ENGINE, None)
    if engine is None:
        raise ValueError("this optimizer was not prepared by flowalign's DeepSpeed setup (no engine)")
    return engine


def gathered_state_dict(module: nn.Module, *, keep: bool) -> dict[str, torch.Tensor]:
    """The full state dict of a module under a DeepSpeed engine as CPU tensors on the keeping process,
    each ZeRO-3 partitioned parameter gathered on its own (a collective: every process calls it).

    Read-only gathering (``modifier_rank=None``): the engine's own consolidated state dict gathers
    with a broadcast that views each parameter as bytes, which fails for 0-d parameters."""
    import deepspeed

    params = dict(module.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict(keep_vars=True).items():
        p = params.get(name)
        gather = [p] if p is not None and hasattr(p, "ds_id") else []
        with deepspeed.zero.GatheredParameters(gather, modifier_rank=None):
            if keep:
                out[name] = value.detach().to("cpu", copy=True).contiguous()
    return out
