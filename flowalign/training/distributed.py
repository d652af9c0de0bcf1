"""How the loop spreads training over processes: DDP (the default), FSDP2 or DeepSpeed ZeRO.

The accelerate launch config picks the strategy (``accelerate launch --config_file
configs/accelerate/<file>.yaml -m flowalign ...``):

- ``ddp``: each process holds the whole model; DDP averages the gradients (or there is one process).
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` through ``Accelerator.prepare(module, *optimizers)``,
  one call per trainable module with the optimizers of its parameter groups. Parameters, gradients
  and optimizer state are sharded DTensors; a gradient is reduce-scattered at every micro-step, so no
  process ever holds a whole gradient. A frozen module marked with :data:`SHARD_FROZEN` (the frozen
  DPO reference of a full fine-tune) is sharded too.
- ``deepspeed``: one DeepSpeed engine (ZeRO stage 2 or 3) per optimizer group, over the module or
  modules of that group (``flowalign.training.deepspeed_engines``); each engine scales its group's
  loss by the accumulation steps, clips and steps.

Checkpoints stay independent of the world size: sharded tensors are gathered one at a time into
full CPU tensors kept by the main process (:func:`full_tensors`) and cut back into this process's
shard on load (:func:`shard_like`), so a checkpoint written by N processes resumes under M with the
same global batch. The final export runs the method's ``export`` on a plain copy of each sharded
module (:class:`ExportCopies`), built on the meta device before sharding and filled with the
gathered weights.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flowalign.training.deepspeed_engines import gathered_state_dict, prepare_deepspeed
from flowalign.training.export_copies import ExportCopies

__all__ = [
    "DDP",
    "DEEPSPEED",
    "FSDP2",
    "SHARD_FROZEN",
    "ExportCopies",
    "full_optimizer_state",
    "full_tensors",
    "prepare_sharded",
    "resolve_strategy",
    "shard_frozen",
    "shard_like",
    "shard_optimizer_state",
    "wants_deepspeed",
    "wants_fsdp",
]

DDP, FSDP2, DEEPSPEED = "ddp", "fsdp2", "deepspeed"

SHARD_FROZEN = "_flowalign_shard_frozen"
"""Attribute (True) on a frozen module that FSDP2 runs should shard; only set it on a module that is
called through ``forward`` (FSDP gathers the parameters in its forward hooks)."""


def wants_deepspeed() -> bool:
    """Whether the launch config asked for DeepSpeed (known before the Accelerator exists)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def wants_fsdp() -> bool:
    """Whether the launch config asked for FSDP (known before the Accelerator exists)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def resolve_strategy(acc: Any) -> str:
    """The strategy of ``acc`` ("ddp", "fsdp2" or "deepspeed"), after two fix-ups for CPU processes.

    accelerate 1.x turns a launch config's FSDP on only for accelerator devices: with CPU processes
    (gloo) it would quietly run DDP, so the FSDP plugin of the launch environment is installed here.
    With DeepSpeed on CPU, accelerate counts one process while DeepSpeed's process group has them
    all, so the process count and index are taken from the process group. FSDP1 is refused.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = acc.state

    def set_state(**values: Any) -> None:  # both singletons: AcceleratorState() re-reads PartialState's
        for key, value in values.items():
            setattr(state, key, value)
            PartialState._shared_state[key] = value

    if wants_fsdp() and acc.distributed_type == DistributedType.MULTI_CPU:
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
        set_state(distributed_type=DistributedType.FSDP)
    if acc.distributed_type == DistributedType.FSDP:
        if state.fsdp_plugin.fsdp_version != 2:
            raise ValueError(
                "the accelerate config selects FSDP version 1; flowalign trains with FSDP2: set "
                "fsdp_config.fsdp_version: 2 (see configs/accelerate/fsdp2_1node_8gpu.yaml)"
            )
        return FSDP2
    if acc.distributed_type == DistributedType.DEEPSPEED:
        dist = torch.distributed
        if dist.is_initialized() and dist.get_world_size() != acc.num_processes:
            set_state(
                num_processes=dist.get_world_size(),
                process_index=dist.get_rank(),
                local_process_index=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
            )
        return DEEPSPEED
    if wants_deepspeed():
        raise ValueError(
            "the accelerate config selects DeepSpeed but accelerate started without it (cpu: true or "
            "use_cpu in the config); DeepSpeed runs on CPU only with use_cpu: false"
        )
    return DDP


# --------------------------------------------------------------------------------------------
# Preparing models and optimizers together


def _group_owners(params: list[nn.Parameter], modules: Mapping[str, nn.Module]) -> list[str]:
    """The trainable modules holding ``params``, in the order of ``modules``."""
    ids = {id(p) for p in params}
    return [name for name, module in modules.items() if any(id(p) in ids for p in module.parameters())]


def prepare_sharded(
    acc: Any,
    strategy: str,
    cfg: Any,
    trainable: Mapping[str, nn.Module],
    groups: Mapping[str, list[nn.Parameter]],
    make_optimizer: Callable[[str, list[nn.Parameter]], torch.optim.Optimizer],
) -> tuple[dict[str, nn.Module], dict[str, Any], dict[str, torch.optim.Optimizer], dict[str, list]]:
    """``Accelerator.prepare(module, *its optimizers)`` for each trainable module.

    A group whose parameters lie in several modules (f-distill's critic: the fake score and the
    discriminator heads) cannot be prepared with any one of them; under FSDP2 each of its modules is
    prepared with a carrier optimizer (plain SGD over the module's share of the group, never stepped)
    that accelerate maps onto the sharded parameters, and the group's real optimizer is built over
    those DTensors afterwards, in the group's parameter order. DeepSpeed builds one engine per group
    (``flowalign.training.deepspeed_engines``).

    Returns (wrapped modules, prepared optimizers, the torch optimizers inside them, the parameter
    groups as the prepared optimizers hold them: DTensors under FSDP2).
    """
    if strategy == DEEPSPEED:  # one engine per optimizer group
        return prepare_deepspeed(acc, cfg, trainable, groups, make_optimizer)
    owners = {g: _group_owners(ps, trainable) for g, ps in groups.items()}
    spanning = [g for g in groups if len(owners[g]) > 1]
    wrapped: dict[str, nn.Module] = {}
    prepared: dict[str, Any] = {}
    base: dict[str, torch.optim.Optimizer] = {}
    sharded: dict[int, Tensor] = {}  # id(original parameter) -> its DTensor, for the spanning groups
    for name, module in trainable.items():
        names = [g for g in groups if owners[g] == [name]]
        optimizers = [make_optimizer(g, list(groups[g])) for g in names]
        carried = [p for g in spanning if name in owners[g] for p in groups[g] if _holds(module, p)]
        carrier = torch.optim.SGD(carried, lr=0.0) if carried else None
        with _wrap_classes_in(acc, module, strategy):
            out = acc.prepare(module, *optimizers, *([carrier] if carrier is not None else []))
        wrapped[name] = out[0]
        for g, opt, raw in zip(names, out[1 : 1 + len(names)], optimizers, strict=True):
            prepared[g], base[g] = opt, raw
        if carrier is not None:
            sharded.update(zip(map(id, carried), _optimizer_params(carrier), strict=True))
            _forget_optimizer(acc, out[-1])
    for g in spanning:
        raw = make_optimizer(g, [sharded[id(p)] for p in groups[g]])
        prepared[g], base[g] = acc.prepare_optimizer(raw, device_placement=False), raw
    # FSDP2: the optimizers now hold the DTensor parameters the modules were sharded into
    return wrapped, prepared, base, {g: _optimizer_params(base[g]) for g in groups}


@contextlib.contextmanager
def _wrap_classes_in(acc: Any, module: nn.Module, strategy: str) -> Iterator[None]:
    """Under FSDP2, the launch config's ``fsdp_transformer_layer_cls_to_wrap`` names cut down to the
    classes ``module`` has while it is prepared: accelerate refuses a module without one of them, and
    a method's small networks (f-distill's discriminator heads) have none (they stay one unit).

    FSDP2 shards every parameter along its first dimension, so it refuses 0-d ones (CLIP's
    ``logit_scale``). A frozen 0-d parameter is left out of the sharding (each process keeps its own
    identical copy, and it has no gradient to reduce); a trainable one is refused with a ValueError."""
    plugin = getattr(acc.state, "fsdp_plugin", None) if strategy == FSDP2 else None
    if plugin is None:
        yield
        return
    scalars = [(n, p) for n, p in module.named_parameters() if p.ndim == 0]
    trainable = [n for n, p in scalars if p.requires_grad]
    if trainable:
        raise ValueError(
            f"FSDP2 cannot shard the trainable 0-d parameters {trainable}: it splits each parameter along "
            "its first dimension; freeze them, store them with shape [1], or use DDP"
        )
    names = getattr(plugin, "transformer_cls_names_to_wrap", None)
    ignored = getattr(plugin, "ignored_modules", None)
    if names:
        present = {type(m).__name__ for m in module.modules()}
        plugin.transformer_cls_names_to_wrap = [n for n in names if n in present]
    if scalars:  # accelerate reads the parameters of these "modules" as fully_shard's ignored_params
        listed = ignored or []
        if isinstance(ignored, str):  # the config's regex over module names, resolved as accelerate does
            listed = [m for n, m in module.named_modules() if re.fullmatch(ignored, n)]
        plugin.ignored_modules = [*listed, nn.ParameterList([p for _, p in scalars])]
    try:
        yield
    finally:
        if names:
            plugin.transformer_cls_names_to_wrap = names
        if scalars:
            plugin.ignored_modules = ignored


def _holds(module: nn.Module, p: nn.Parameter) -> bool:
    return any(q is p for q in module.parameters())


def _forget_optimizer(acc: Any, prepared: Any) -> None:
    """Drop an accelerate-prepared carrier optimizer from the accelerator's list (it is never stepped)."""
    acc._optimizers = [o for o in acc._optimizers if o is not prepared]


def shard_frozen(acc: Any, modules: Iterable[nn.Module]) -> None:
    """``fully_shard`` each frozen module marked with :data:`SHARD_FROZEN` (FSDP2 runs only): first
    each of its blocks that the launch config wraps (:func:`frozen_units`), then the module itself.
    A module still on the CPU thus reaches the device one block at a time, as this process's shard."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = getattr(acc, "torch_device_mesh", None)
    for module in modules:
        if getattr(module, SHARD_FROZEN, False) and not isinstance(module, FSDPModule):
            for unit in frozen_units(acc, module):
                fully_shard(unit, mesh=mesh)
            fully_shard(module, mesh=mesh)


def frozen_units(acc: Any, module: nn.Module) -> list[nn.Module]:
    """The submodules of ``module`` that get an FSDP unit of their own: those whose class the launch
    config's ``fsdp_transformer_layer_cls_to_wrap`` names (else the model's ``_no_split_modules``),
    none when the config wraps nothing (``NO_WRAP``)."""
    plugin = getattr(acc.state, "fsdp_plugin", None)
    if plugin is None or getattr(plugin, "auto_wrap_policy", None) is None:
        return []
    names = getattr(plugin, "transformer_cls_names_to_wrap", None) or getattr(
        module, "_no_split_modules", None
    )
    wanted = set(names or ())
    return [m for m in module.modules() if m is not module and type(m).__name__ in wanted]


def reshard(modules: Iterable[nn.Module]) -> None:
    """Put every FSDP2 unit of ``modules`` back in its sharded state. A unit whose forward ran without a
    backward (a network sampled under no_grad by another group's loss) otherwise keeps its gathered
    parameters registered, which EMA, checkpoints and the next optimizer step must not see."""
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        for sub in module.modules():
            if isinstance(sub, FSDPModule):
                sub.reshard()


# --------------------------------------------------------------------------------------------
# Full tensors from shards and back


def full_tensors(named: Iterable[tuple[str, Tensor]], *, keep: bool) -> dict[str, Tensor]:
    """CPU copies of full tensors, gathered one at a time from DTensor shards (a collective: every
    process must call it with the same names); plain tensors are copied as they are. Only a process
    with ``keep`` holds the result (the others return an empty dict)."""
    out: dict[str, Tensor] = {}
    for name, t in named:
        t = t.detach()
        full = t.full_tensor() if _is_dtensor(t) else t
        if keep:
            out[name] = full.to("cpu", copy=True).contiguous()
        del full
    return out


def shard_like(value: Tensor, ref: Tensor) -> Tensor:
    """``value`` (a full tensor) as ``ref`` holds it: this process's shard for a DTensor ``ref``
    (cut locally, no communication), else ``value`` on ``ref``'s device and dtype."""
    value = value.to(device=ref.device, dtype=ref.dtype)
    if not _is_dtensor(ref):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, ref.device_mesh, ref.placements, src_data_rank=None)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def as_float(norm: Any) -> float:
    """A gradient norm as a float (a replicated DTensor is read locally; None, before DeepSpeed's
    first step, is NaN)."""
    if norm is None:
        return float("nan")
    if _is_dtensor(norm):
        norm = norm.to_local()
    return float(norm)


def full_trainable(module: nn.Module, strategy: str, *, keep: bool) -> dict[str, Tensor]:
    """The full ``requires_grad`` parameters of a prepared module (fp32 masters under DeepSpeed)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if strategy == DEEPSPEED:
        from deepspeed.utils import safe_get_full_fp32_param

        named = [(n, safe_get_full_fp32_param(p)) for n, p in named]
    return full_tensors(named, keep=keep)


def load_full_trainable(module: nn.Module, state: Mapping[str, Tensor], strategy: str) -> None:
    """Inverse of :func:`full_trainable` for DeepSpeed: the engine's fp32 masters and its module's
    (possibly low-precision) parameters both take the values (every process calls it)."""
    from deepspeed.utils import safe_set_full_fp32_param

    with torch.no_grad():
        for n, p in module.named_parameters():
            if p.requires_grad:
                value = state[n].to(p.device)
                safe_set_full_fp32_param(p, value.float())
                if p.numel() == value.numel():  # ZeRO-2: the module keeps whole parameters
                    p.copy_(value.to(p.dtype))


def _deepspeed_optimizer_state(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], *, keep: bool
) -> dict | None:
    """A torch AdamW-style state dict (``state[i]`` for ``params[i]``) from a ZeRO optimizer."""
    from deepspeed.utils import safe_get_full_optimizer_state

    steps = [s["step"] for s in optimizer.state.values() if "step" in s]
    state = {}
    for i, p in enumerate(params if optimizer.state else []):  # no state before the group's first step
        full = full_tensors(
            [(k, safe_get_full_optimizer_state(p, k)) for k in ("exp_avg", "exp_avg_sq")], keep=keep
        )
        if keep:
            step = steps[0].detach().to("cpu", torch.float32).clone() if steps else torch.tensor(0.0)
            state[i] = {"step": step, **full}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    groups[0]["params"] = list(range(len(params)))
    return {"state": state, "param_groups": groups} if keep else None


def load_deepspeed_optimizer_state(
    sd: Mapping, prepared: Any, base: torch.optim.Optimizer, params: list
) -> None:
    """Load a full AdamW-style state dict into a ZeRO optimizer (its fp32 partitions and step).

    ZeRO creates the Adam state of its flat fp32 partitions at the first step and only then links each
    parameter to its slice; a resume comes before that, so the state is created here (zeros) and
    linked through the ZeRO optimizer's own lazy-init hook (DeepSpeed 0.19, stages 1-2)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    for group, saved in zip(base.param_groups, sd["param_groups"], strict=False):
        group.update({k: v for k, v in saved.items() if k != "params"})
    if not sd["state"]:  # saved before the group's first step: ZeRO creates the state at that step
        return
    flats = _optimizer_params(base)
    for flat in flats:
        if not base.state.get(flat):
            base.state[flat] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
    link = getattr(prepared.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    steps = set()
    for i, p in enumerate(params):
        entry = sd["state"].get(i)
        if entry is None:
            continue
        steps.add(float(entry["step"]))
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, entry[key].to(p.device).float(), key)
    if len(steps) > 1:
        raise ValueError(f"optimizer state has several step counts {sorted(steps)}; ZeRO keeps one per group")
    if steps:
        step = steps.pop()
        for flat in flats:
            base.state[flat]["step"] = torch.tensor(step)


def full_optimizer_state(
    optimizer: torch.optim.Optimizer, *, keep: bool, strategy: str = FSDP2, params: list | None = None
) -> dict | None:
    """``optimizer.state_dict()`` with each sharded state tensor gathered into a full CPU tensor (a
    collective), so it loads into a plain optimizer too. None on processes without ``keep``."""
    if strategy == DEEPSPEED:
        return _deepspeed_optimizer_state(optimizer, list(params or []), keep=keep)
    sd = optimizer.state_dict()
    state: dict = {}
    for idx in sorted(sd["state"]):
        entry = sd["state"][idx]
        tensors = [(k, v) for k, v in entry.items() if isinstance(v, Tensor)]
        full = full_tensors(tensors, keep=keep)
        state[idx] = {k: full.get(k, v) if isinstance(v, Tensor) else v for k, v in entry.items()}
    return {"state": state, "param_groups": sd["param_groups"]} if keep else None


def shard_optimizer_state(sd: Mapping, optimizer: torch.optim.Optimizer) -> dict:
    """A full optimizer state dict cut into the shards of ``optimizer``'s DTensor parameters."""
    params = _optimizer_params(optimizer)
    state = {}
    for idx, entry in sd["state"].items():
        p = params[int(idx)]
        state[idx] = {
            k: shard_like(v, p) if isinstance(v, Tensor) and v.shape == p.shape and _is_dtensor(p) else v
            for k, v in entry.items()
        }
    return {"state": state, "param_groups": sd["param_groups"]}


def full_module_state(acc: Any, module: nn.Module, strategy: str, *, keep: bool) -> dict[str, Tensor]:
    """The whole state dict of a prepared module as full CPU tensors on the keeping process
    (DeepSpeed ZeRO-3: each partitioned parameter gathered on its own, in the module's dtype)."""
    if strategy == DEEPSPEED:  # an engine, or a module of a group of several under its engine
        from deepspeed import DeepSpeedEngine

        return gathered_state_dict(
            module.module if isinstance(module, DeepSpeedEngine) else module, keep=keep
        )
    return full_tensors(module.state_dict().items(), keep=keep)
