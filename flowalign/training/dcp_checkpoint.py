"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), the layout of FSDP2 runs.

A sharded checkpoint is the folder of :mod:`flowalign.training.checkpoint` with the large tensors moved
into ``shards/``, which DCP writes with every process storing only its own shards (one
``__<rank>_0.distcp`` file each, plus DCP's ``.metadata``)::

    shards/                    model/<module>/<parameter>   trainable parameters
                               optim/<group>/<index>/<key>  optimizer state shaped like its parameter
                               ema/<name>                   the EMA shadow
    optimizer.pt               {group: state_dict()} with each of those tensors replaced by ``SHARDED``
    scheduler.pt, rng.pt, method_state.pt, state.json, config.yaml, manifest.json   as in the full layout

Every process writes its shards into the same temporary folder (the main process creates it and
tells the others its name), then the main process writes the small files and the manifest, which
lists the shard files with their sizes and hashes, and renames the folder into place: the
checkpoint stays atomic. DCP stores each tensor's global shape and the slice each file holds, so
the shards load under any process count: an FSDP2 run reads its own slices straight into its
DTensors (:func:`load_sharded`), any other run reads whole tensors (:func:`load_full`); both read
the bytes written, so a resume under another world size is exact.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowalign.training.checkpoint import Checkpoint, CheckpointError, checkpoint_dir_name, load_checkpoint

__all__ = [
    "SHARDED",
    "SHARDS",
    "load_full",
    "load_sharded",
    "load_verified",
    "read_full",
    "resolve_layout",
    "save_shards",
    "start_sharded",
]

SHARDS = "shards"
SHARDED = "<sharded>"
"""Stands in ``optimizer.pt`` for a state tensor stored in ``shards/``."""


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without DCP's warning that a run without a process group saves or loads as one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _is_sharded_state(value: Any, param: Tensor) -> bool:
    return isinstance(value, Tensor) and value.shape == param.shape and value.ndim > 0


def _entries(
    trainable: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer], ema: Any
) -> dict[str, Tensor]:
    """The flat DCP state: every tensor of the checkpoint that is as large as a parameter."""
    out: dict[str, Tensor] = {}
    for name, module in trainable.items():
        for pname, p in module.named_parameters():
            if p.requires_grad:
                out[f"model/{name}/{pname}"] = p.detach()
    for group, opt in optimizers.items():
        for idx, p in enumerate(_params(opt)):
            for key, value in opt.state.get(p, {}).items():
                if _is_sharded_state(value, p):
                    out[f"optim/{group}/{idx}/{key}"] = value
    if ema is not None:
        out.update({f"ema/{n}": t for n, t in ema.shadow.items()})
    return out


def _skeleton(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with its parameter-shaped state tensors replaced by :data:`SHARDED`
    (small tensors, such as Adam's step count, are kept whole)."""
    from flowalign.training.distributed import full_tensors

    sd = optimizer.state_dict()
    params = _params(optimizer)
    state = {}
    for idx in sorted(sd["state"]):
        entry = {}
        for key, value in sd["state"][idx].items():
            if _is_sharded_state(value, params[idx]):
                entry[key] = SHARDED
            elif isinstance(value, Tensor):
                entry[key] = full_tensors([(key, value)], keep=True)[key]
            else:
                entry[key] = value
        state[idx] = entry
    return {"state": state, "param_groups": sd["param_groups"]}


def start_sharded(acc: Any, output_dir: Path, step: int) -> Path:
    """The temporary folder of a sharded checkpoint, created by the main process (a collective)."""
    from accelerate.utils import broadcast_object_list

    name: list[str | None] = [None]
    if acc.is_main_process:
        final = output_dir / checkpoint_dir_name(step)
        tmp = output_dir / f"{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        name[0] = str(tmp)
    return Path(broadcast_object_list(name)[0])


def save_shards(
    tmp: Path,
    trainable: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    ema: Any,
) -> dict[str, dict]:
    """Write this process's shards into ``tmp/shards`` (a collective); returns the optimizer skeletons
    for ``optimizer.pt``."""
    import torch.distributed.checkpoint as dcp

    with _quiet():
        dcp.save(_entries(trainable, optimizers, ema), checkpoint_id=tmp / SHARDS, no_dist=not _distributed())
    return {g: _skeleton(o) for g, o in optimizers.items()}


def _metadata(path: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(path / SHARDS)).read_metadata().state_dict_metadata
    except Exception as err:  # a missing or unreadable .metadata: DCP raises several kinds
        raise CheckpointError(f"{path / SHARDS}: unreadable DCP metadata: {err}") from None


def _read(path: Path, targets: dict[str, Tensor], *, distributed: bool) -> None:
    """Fill ``targets`` in place from ``path/shards``; every stored name must be asked for and vice versa."""
    import torch.distributed.checkpoint as dcp

    stored = set(_metadata(path))
    missing, unexpected = sorted(targets.keys() - stored), sorted(stored - targets.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{path / SHARDS}: does not match the run (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    try:
        with _quiet():
            dcp.load(targets, checkpoint_id=path / SHARDS, no_dist=not distributed)
    except Exception as err:
        raise CheckpointError(f"{path / SHARDS}: cannot be read: {type(err).__name__}: {err}") from None


def _fill_skeleton(skeleton: dict, group: str, values: Mapping[str, Tensor]) -> dict:
    state = {}
    for idx, entry in skeleton["state"].items():
        state[idx] = {
            k: values[f"optim/{group}/{idx}/{k}"] if isinstance(v, str) and v == SHARDED else v
            for k, v in entry.items()
        }
    return {"state": state, "param_groups": skeleton["param_groups"]}


def load_full(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` with its weights, optimizer state and EMA read from ``shards/`` as whole CPU tensors
    (each process reads on its own, no collective); a full-layout checkpoint is returned as it is."""
    if ckpt.layout != "sharded":
        return ckpt
    meta = _metadata(ckpt.path)
    values = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if hasattr(m, "size") and hasattr(m, "properties")
    }
    _read(ckpt.path, values, distributed=False)
    weights: dict[str, dict[str, Tensor]] = {}
    ema: dict[str, Tensor] | None = None
    for key, value in values.items():
        kind, _, rest = key.partition("/")
        if kind == "model":
            module, _, pname = rest.partition("/")
            weights.setdefault(module, {})[pname] = value
        elif kind == "ema":
            ema = {**(ema or {}), rest: value}
    optimizers = {g: _fill_skeleton(sk, g, values) for g, sk in ckpt.optimizers.items()}
    return Checkpoint(
        path=ckpt.path,
        step=ckpt.step,
        state=ckpt.state,
        weights=weights,
        optimizers=optimizers,
        schedulers=ckpt.schedulers,
        rng_states=ckpt.rng_states,
        method_state=ckpt.method_state,
        ema=ema,
        config=ckpt.config,
        files=ckpt.files,
        layout="full",
    )


def read_full(path: str | os.PathLike) -> Checkpoint:
    """:func:`load_checkpoint` then :func:`load_full`: any checkpoint as whole tensors (e.g. to compare
    or convert one)."""
    return load_full(load_checkpoint(path))


def load_sharded(
    ckpt: Checkpoint,
    trainable: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    ema: Any,
) -> None:
    """Restore the weights, optimizer state and EMA of a sharded checkpoint straight into this
    process's shards (a collective; DCP reads the slices each DTensor holds, whatever the world size
    that wrote them). Optimizer state is created as zeros shaped like each parameter, filled, and
    loaded with ``load_state_dict``."""
    if ckpt.layout != "sharded":
        raise ValueError(f"{ckpt.path} is not a sharded checkpoint")
    state: dict[str, dict] = {}
    targets: dict[str, Tensor] = {}
    for group, opt in optimizers.items():
        if group not in ckpt.optimizers:
            raise CheckpointError(f"{ckpt.path}: no optimizer state for group {group!r}")
        params = _params(opt)
        skeleton = ckpt.optimizers[group]
        for idx, entry in skeleton["state"].items():
            for key, value in entry.items():
                if isinstance(value, str) and value == SHARDED:
                    targets[f"optim/{group}/{idx}/{key}"] = torch.zeros_like(params[int(idx)])
        state[group] = skeleton
    with torch.no_grad():
        targets.update(_entries(trainable, {}, ema))
        _read(ckpt.path, targets, distributed=_distributed())
    for group, opt in optimizers.items():
        opt.load_state_dict(_fill_skeleton(state[group], group, targets))


def load_verified(acc: Any, path: str | os.PathLike) -> Checkpoint:
    """:func:`load_checkpoint` on every process, with the sizes and hashes of its files (every shard
    of every process) checked once, by the main process, whose verdict all processes share: a damaged
    file raises the same :class:`CheckpointError` everywhere, and no process reads the others' shards
    just to hash them."""
    from accelerate.utils import broadcast_object_list

    from flowalign.training.checkpoint import verify_checkpoint

    if acc.num_processes == 1:
        return load_checkpoint(path)
    verdict: list[str | None] = [None]
    if acc.is_main_process:
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            verdict[0] = str(err)
    verdict = broadcast_object_list(verdict)
    if verdict[0] is not None:
        raise CheckpointError(verdict[0])
    return load_checkpoint(path, verify=False)


def resolve_layout(layout: str, strategy: str) -> str:
    """The checkpoint layout of a run: ``auto`` is sharded under FSDP2 and full otherwise; DeepSpeed
    keeps the full layout (its engine owns the optimizer partitions)."""
    from flowalign.training.distributed import DEEPSPEED, FSDP2

    if layout == "auto":
        return "sharded" if strategy == FSDP2 else "full"
    if layout == "sharded" and strategy == DEEPSPEED:
        raise ValueError("checkpoint.layout 'sharded' is for FSDP2 and DDP runs; DeepSpeed writes 'full'")
    return layout
