"""The one training loop: accelerate, accumulate, clip, step, EMA, log, checkpoint, resume.

``train(method, dataset, config)`` runs any :class:`~flowalign.training.method.Method`. Per step:

1. the next global batch of a seeded per-epoch order (``flowalign.training.batches``), this
   process's ``grad_accum_steps`` micro-batches of it;
2. for each group in ``method.groups_to_update(step)``: ``compute_loss`` on each micro-batch
   under autocast, backward of ``loss / grad_accum_steps`` (DDP syncs on the last micro-step);
   loss and metrics averaged over micro-batches and processes; the group's gradient norm clipped;
   ``optimizer.step()`` unless the loss or the norm is not finite (then the step is skipped and
   counted; ``max_nan_steps_in_row`` skipped steps in a row raise :class:`TrainingDiverged`).
   The LR schedule advances on every step, skipped or not;
3. EMA update, a metrics record (``metrics.jsonl`` + trackers), periodic checkpoints.

The accelerate launch config chooses how processes share the work: DDP (the default, each process
holds the model), FSDP2 or DeepSpeed ZeRO (models and optimizers prepared together, checkpoints and
exports gathered into full tensors); see ``flowalign.training.distributed``.

SIGTERM finishes the current step, writes a checkpoint and returns (``interrupted=True``).
Resuming restores weights, EMA, optimizer/scheduler/RNG state, method state and the data cursor,
and truncates ``metrics.jsonl`` to the resumed step: N steps straight and N/2 + resume + N/2
give bit-identical weights and logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

from flowalign.config import TrainConfig, config_to_dict, save_config
from flowalign.training import dcp_checkpoint as dcp_
from flowalign.training import deepspeed_engines as ds_
from flowalign.training import distributed as dist_
from flowalign.training.batches import DataCursor, to_device
from flowalign.training.checkpoint import (
    Checkpoint,
    capture_rng_state,
    find_latest_checkpoint,
    list_checkpoints,
    load_trainable_state_dict,
    remove_stale_tmp_dirs,
    restore_rng_state,
    save_checkpoint,
)
from flowalign.training.ema import EMA
from flowalign.training.memory import enable_gradient_checkpointing
from flowalign.training.method import Method, StepContext
from flowalign.training.offload import place_frozen, restore_offloaded
from flowalign.training.optim import build_lr_scheduler, build_optimizer
from flowalign.training.previews import Previews
from flowalign.training.savers import enable_run_vae_savers
from flowalign.training.speed import apply_speed_switches

__all__ = ["METRICS_FILE", "TrainResult", "TrainingDiverged", "train"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


@dataclass
class TrainResult:
    """What :func:`train` leaves behind."""

    step: int
    """Optimizer steps done (== max_steps unless interrupted)."""
    output_dir: Path
    """The run folder."""
    checkpoint: Path | None
    """The last checkpoint written by this call (None if none was)."""
    export_dir: Path | None
    """``output_dir/final`` after a completed run (EMA weights in ``final-ema``), else None."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last logged metrics record."""
    nan_skipped: int = 0
    """Steps skipped for a non-finite loss or gradient over the whole run (resumes included)."""
    interrupted: bool = False
    """True when SIGTERM stopped the run early (a checkpoint was written; resume to continue)."""


# --------------------------------------------------------------------------------------------
# Small helpers


_HOOKS = (
    "frozen_modules",
    "optimizer_groups",
    "optim_config",
    "groups_to_update",
    "ema_modules",
    "collate",
    "state_dict",
    "load_state_dict",
    "export",
)


class _MethodAdapter(Method):
    """Gives an object that only duck-types :class:`Method` the base class's defaults for missing hooks
    (the defaults then call the object's own hooks where it has them)."""

    def __init__(self, obj: Any) -> None:
        for required in ("trainable_modules", "compute_loss"):
            if not callable(getattr(obj, required, None)):
                raise TypeError(f"{type(obj).__name__} is not a Method: it has no {required}()")
        self._obj = obj
        for name in _HOOKS:
            if callable(getattr(obj, name, None)):
                setattr(self, name, getattr(obj, name))  # instance attributes win over the defaults

    def trainable_modules(self) -> dict[str, nn.Module]:
        return self._obj.trainable_modules()

    def compute_loss(
        self, batch: dict, ctx: StepContext, group: str
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        return self._obj.compute_loss(batch, ctx, group)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _truncate_metrics(path: Path, *, last_step: int) -> None:
    """Keep only records with step <= last_step (a torn last line is dropped too)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _make_accelerator(cfg: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    # The accelerate state is a per-process singleton; a second train() in one process (tests,
    # notebooks) with another precision would be refused without this reset (private API of
    # accelerate 1.x). The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=cfg.cpu,
        log_with=list(cfg.trackers) or None,
        project_config=ProjectConfiguration(
            project_dir=str(cfg.output_dir), logging_dir=str(Path(cfg.output_dir) / "logs")
        ),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp_find_unused_parameters)
        ],
    )


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[list[bool]]:
    """A one-element list set to True when SIGTERM arrives (handler installed from the main thread only)."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        flag[0] = True
        logger.warning("SIGTERM received: finishing the current step, then checkpointing and stopping")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_groups(groups: dict[str, list[nn.Parameter]], modules: Mapping[str, nn.Module]) -> None:
    seen: dict[int, str] = {}
    for name, params in groups.items():
        if not params:
            raise ValueError(f"optimizer group {name!r} has no parameters")
        for p in params:
            if not p.requires_grad:
                raise ValueError(f"optimizer group {name!r} contains a parameter with requires_grad=False")
            if id(p) in seen:
                raise ValueError(f"a parameter is in optimizer groups {seen[id(p)]!r} and {name!r}")
            seen[id(p)] = name
    for mname, module in modules.items():
        for pname, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                raise ValueError(
                    f"trainable parameter {mname}.{pname} is in no optimizer group; freeze it or add it"
                )


def _resolve_start(acc: Any, output_dir: Path, resume: bool | str | os.PathLike) -> str | None:
    """The checkpoint to resume from (decided on the main process, broadcast to all), or None."""
    from accelerate.utils import broadcast_object_list

    decision: tuple[str, str | None] = ("fresh", None)
    if acc.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp_dirs(output_dir)
        if resume is False:
            existing = list_checkpoints(output_dir)
            if existing:
                decision = (
                    "error",
                    f"{output_dir} already holds checkpoints ({existing[-1].name}, ...); "
                    "pass resume=True to continue that run or choose a new output_dir",
                )
        elif resume is True:
            latest = find_latest_checkpoint(output_dir)
            decision = ("resume", str(latest)) if latest else ("fresh", None)
        else:
            decision = ("resume", str(Path(resume)))
    kind, value = broadcast_object_list([decision])[0]
    if kind == "error":
        raise ValueError(value)
    return value


# --------------------------------------------------------------------------------------------
# One run


class _Run:
    """The state of one train() call: modules, optimizers, EMA, data cursor and counters."""

    def __init__(self, method: Method, method_name: str, cfg: TrainConfig, acc: Any, strategy: str) -> None:
        self.method, self.method_name, self.cfg, self.acc = method, method_name, cfg, acc
        self.strategy, self.sharded = strategy, strategy != dist_.DDP
        self.device = acc.device
        self.trainable = dict(method.trainable_modules())
        if not self.trainable:
            raise ValueError(f"{method_name}.trainable_modules() returned no modules")
        for name, module in self.trainable.items():
            if not any(p.requires_grad for p in module.parameters()):
                raise ValueError(f"trainable module {name!r} has no parameter with requires_grad=True")
            if cfg.gradient_checkpointing:
                enable_gradient_checkpointing(module, name)
            module.train()
        enable_run_vae_savers(method, cfg)
        frozen = method.frozen_modules()
        offload, sharded = cfg.offload_frozen, self.sharded
        place_frozen(frozen, self.trainable, self.device, offload=offload, sharded=sharded, owner=method)
        apply_speed_switches(
            self.trainable,
            method.frozen_modules().values(),
            compile=cfg.compile,
            compile_backend=cfg.compile_backend,
            attention_backend=cfg.attention_backend,
        )
        self.groups = dict(method.optimizer_groups())
        _check_groups(self.groups, self.trainable)
        group_cfgs = {g: method.optim_config(g, cfg.optim) for g in self.groups}
        self.export_copies: dist_.ExportCopies | None = None
        if self.sharded:  # model and optimizers prepared together (FSDP2 / DeepSpeed)
            if cfg.ema.use and strategy == dist_.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3:
                raise ValueError("EMA is not supported under DeepSpeed ZeRO-3 (use FSDP2 or ZeRO-2)")
            if strategy == dist_.FSDP2 or acc.state.deepspeed_plugin.zero_stage == 3:
                self.export_copies = dist_.ExportCopies(self.trainable, build=acc.is_main_process)
            self.wrapped, self.optimizers, self.base_optimizers, self.groups = dist_.prepare_sharded(
                acc,
                strategy,
                cfg,
                self.trainable,
                self.groups,
                lambda g, ps: build_optimizer(ps, group_cfgs[g], device=self.device),
            )
            if strategy == dist_.FSDP2:
                dist_.shard_frozen(acc, method.frozen_modules().values())
        else:
            # prepare_model: device placement, DDP when distributed, autocast forward with mixed precision
            self.wrapped = {name: acc.prepare_model(module) for name, module in self.trainable.items()}
            self.optimizers = {
                g: acc.prepare_optimizer(build_optimizer(ps, group_cfgs[g], device=self.device))
                for g, ps in self.groups.items()
            }
            self.base_optimizers = {g: opt.optimizer for g, opt in self.optimizers.items()}
        self.ddp = [w for w in self.wrapped.values() if isinstance(w, nn.parallel.DistributedDataParallel)]
        self.schedulers = {
            g: build_lr_scheduler(opt, group_cfgs[g], max_steps=cfg.max_steps)
            for g, opt in self.base_optimizers.items()
        }
        self.ema_names = list(method.ema_modules()) if cfg.ema.use else []
        self.ema = EMA(self.ema_modules(), decay=cfg.ema.decay) if cfg.ema.use else None
        self.step, self.epoch, self.position, self.nan_total, self.nan_in_row = 0, 0, 0, 0, 0
        self.layout = dcp_.resolve_layout(cfg.checkpoint.layout, strategy)

    def ema_modules(self) -> dict[str, nn.Module]:
        return {n: self.trainable[n] for n in self.ema_names}

    def restore(self, ckpt: Checkpoint) -> None:
        where = ckpt.path
        if ckpt.layout == "sharded" and self.strategy == dist_.FSDP2:
            # each process reads its own slices of the shards, whatever the world size that wrote them
            dcp_.load_sharded(ckpt, self.trainable, self.base_optimizers, self.ema)
        else:
            self.restore_full(dcp_.load_full(ckpt))
        for g in self.optimizers:
            if g not in ckpt.schedulers:
                raise ValueError(f"{where}: no scheduler state for group {g!r}")
            self.schedulers[g].load_state_dict(ckpt.schedulers[g])
        rank = self.acc.process_index
        if rank < len(ckpt.rng_states):
            restore_rng_state(ckpt.rng_states[rank])
        else:
            logger.warning(
                "%s has RNG states for %d processes; rank %d keeps its seed",
                where,
                len(ckpt.rng_states),
                rank,
            )
        self.method.load_state_dict(ckpt.method_state)
        if self.acc.scaler is not None and ckpt.state.get("grad_scaler"):
            self.acc.scaler.load_state_dict(ckpt.state["grad_scaler"])
        self.step = int(ckpt.step)
        self.epoch, self.position = int(ckpt.state["epoch"]), int(ckpt.state["position"])
        self.nan_total, self.nan_in_row = (
            int(ckpt.state.get("nan_skipped", 0)),
            int(ckpt.state.get("nan_in_row", 0)),
        )

    def restore_full(self, ckpt: Checkpoint) -> None:
        """Weights, EMA and optimizer state from whole tensors (cut into shards under FSDP2)."""
        where = ckpt.path
        for name, module in self.trainable.items():
            if name not in ckpt.weights:
                raise ValueError(
                    f"{where}: no weights for trainable module {name!r} (has {sorted(ckpt.weights)})"
                )
            if self.strategy == dist_.DEEPSPEED:
                dist_.load_full_trainable(module, ckpt.weights[name], self.strategy)
            else:  # FSDP2: each process copies its shard of the full tensors
                load_trainable_state_dict(
                    module, ckpt.weights[name], source=f"{where}/model-{name}.safetensors"
                )
        if self.ema is not None:
            if ckpt.ema is None:
                raise ValueError(f"{where}: EMA is on but the checkpoint has no ema.safetensors")
            self.ema.load_state_dict(ckpt.ema)
        for g, opt in self.optimizers.items():
            if g not in ckpt.optimizers:
                raise ValueError(f"{where}: no optimizer state for group {g!r}")
            state = ckpt.optimizers[g]
            if self.strategy == dist_.DEEPSPEED:
                dist_.load_deepspeed_optimizer_state(state, opt, self.base_optimizers[g], self.groups[g])
            elif self.strategy == dist_.FSDP2:
                opt.load_state_dict(dist_.shard_optimizer_state(state, self.base_optimizers[g]))
            else:
                opt.load_state_dict(state)

    def check_loss(self, loss: object, group: str) -> None:
        """A method's loss must be a scalar tensor that reaches a trainable parameter."""
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"{self.method_name}.compute_loss(group={group!r}) must return a scalar loss "
                f"(the micro-batch mean), got {shape}"
            )
        if not loss.requires_grad:
            raise ValueError(
                f"{self.method_name}.compute_loss(group={group!r}) returned a loss without gradient "
                "(no trainable parameter reached it)"
            )

    def update_group(
        self, group: str, micro_batches: list[dict], stop_flag: list[bool]
    ) -> tuple[dict[str, float], bool, bool]:
        """Accumulate, reduce, clip and step one group. Returns (values, stepped, skipped_for_nan);
        values has "loss", "grad_norm", "lr", the method's metrics and "stop" (any process got SIGTERM)."""
        cfg, acc, opt, params = self.cfg, self.acc, self.optimizers[group], self.groups[group]
        opt.zero_grad(set_to_none=True)
        n_micro = len(micro_batches)
        losses: list[Tensor] = []
        sums: dict[str, Tensor] = {}
        for k, batch in enumerate(micro_batches):
            ctx = StepContext(
                step=self.step,
                seed=cfg.seed,
                group=group,
                micro_step=k,
                process_index=acc.process_index,
                num_processes=acc.num_processes,
                device=self.device,
                mixed_precision=cfg.mixed_precision,
                modules=self.wrapped,
            )
            with contextlib.ExitStack() as stack:
                if k < n_micro - 1:  # gradients are all-reduced once, on the last micro-step
                    for w in self.ddp:
                        stack.enter_context(acc.no_sync(w))
                with acc.autocast():
                    loss, metrics = self.method.compute_loss(batch, ctx, group)
                self.check_loss(loss, group)
                if self.strategy == dist_.DEEPSPEED:  # the engine divides by the accumulation steps and steps
                    ds_.engine_for(opt).backward(loss, sync_gradients=k == n_micro - 1)
                else:
                    acc.backward(loss / n_micro)
            losses.append(loss.detach().float())
            for key, value in metrics.items():
                v = value.detach().float().mean() if isinstance(value, Tensor) else torch.tensor(float(value))
                sums[key] = sums.get(key, torch.zeros((), device=self.device)) + v.to(self.device)
        keys = sorted(sums)
        local = torch.stack(
            [torch.stack(losses).mean()]
            + [sums[key] / n_micro for key in keys]
            + [torch.tensor(float(stop_flag[0]), device=self.device)]  # read after the work
        )
        # one small all-reduce per group and step; metric keys must be the same on every process
        values = (acc.reduce(local, reduction="mean") if acc.num_processes > 1 else local).tolist()
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
        if self.strategy == dist_.DEEPSPEED:  # the engine clipped and stepped; this is its norm
            norm = dist_.as_float(ds_.engine_for(opt).get_global_grad_norm())
        else:
            # this group only (the accelerator's clip_grad_norm_ unscales every group's optimizer, and
            # under FSDP it compares parameter lists with ==, which fails with several sharded modules);
            # with FSDP2 the gradients are DTensors and torch's norm covers all shards
            acc.unscale_gradients(optimizer=opt)
            norm = dist_.as_float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        lr = self.schedulers[group].get_last_lr()[0]
        loss_value = values[0]
        finite = math.isfinite(loss_value) and math.isfinite(norm)
        overflow = acc.scaler is not None and math.isfinite(loss_value) and not math.isfinite(norm)
        stepped = False
        if finite or overflow:
            opt.step()  # with fp16 the grad scaler skips an overflowing step itself and lowers its scale
            stepped = not getattr(opt, "step_was_skipped", False)
        opt.zero_grad(set_to_none=True)
        if self.strategy == dist_.FSDP2:
            dist_.reshard(self.trainable.values())
        with warnings.catch_warnings():
            # the schedule follows the step count, skipped steps included; torch warns when the very
            # first optimizer step was skipped, which is intended here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.schedulers[group].step()
        out = {"loss": loss_value, "grad_norm": norm, "lr": lr, "stop": values[-1]}
        out.update(zip(keys, values[1:-1], strict=True))
        return out, stepped, not (finite or overflow)

    def write_checkpoint(self, output_dir: Path, cursor: DataCursor, run_cfg: dict) -> Path:
        from accelerate.utils import broadcast_object_list, gather_object

        rng_states = gather_object([capture_rng_state()])
        path: list[str | None] = [None]
        main = self.acc.is_main_process
        modules: Mapping[str, Any] = self.trainable
        optimizers = ema = tmp = None
        if self.layout == "sharded":  # every process writes its shards into the main one's tmp folder
            tmp = dcp_.start_sharded(self.acc, output_dir, self.step)
            optimizers = dcp_.save_shards(tmp, self.trainable, self.base_optimizers, self.ema)
            modules = {}
        elif self.sharded:  # full tensors gathered by every process, kept by the main one
            modules = {
                n: dist_.full_trainable(m, self.strategy, keep=main) for n, m in self.trainable.items()
            }
            optimizers = {
                g: dist_.full_optimizer_state(o, keep=main, strategy=self.strategy, params=self.groups[g])
                for g, o in self.base_optimizers.items()
            }
            if self.ema is not None:
                ema = dist_.full_tensors(self.ema.shadow.items(), keep=main)
        elif main:
            optimizers = {g: opt.state_dict() for g, opt in self.optimizers.items()}
            ema = self.ema.state_dict() if self.ema is not None else None
        if main:
            state = {
                **cursor.state(),
                "nan_skipped": self.nan_total,
                "nan_in_row": self.nan_in_row,
                "num_processes": self.acc.num_processes,
                "grad_scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
            }
            path[0] = str(
                save_checkpoint(
                    output_dir,
                    self.step,
                    modules=modules,
                    optimizers=optimizers,
                    schedulers={g: s.state_dict() for g, s in self.schedulers.items()},
                    state=state,
                    rng_states=rng_states,
                    ema=ema,
                    method_state=self.method.state_dict(),
                    config=run_cfg,
                    keep_last=self.cfg.checkpoint.keep_last,
                    tmp=tmp,
                )
            )
        return Path(broadcast_object_list(path)[0])


def _export_sharded(run: _Run, method: Method, output_dir: Path) -> None:
    """``method.export`` on the main process with plain copies of the sharded modules swapped in,
    filled with the gathered weights (every process takes part in the gathering)."""
    main, copies = run.acc.is_main_process, run.export_copies
    states = {n: dist_.full_module_state(run.acc, w, run.strategy, keep=main) for n, w in run.wrapped.items()}
    ema = dist_.full_tensors(run.ema.shadow.items(), keep=main) if run.ema is not None else None
    if not main:
        return
    copies.fill(states)
    del states
    with copies.swapped(method):
        method.export(output_dir / "final")
        if ema is not None:
            copies.load_trainable(ema, run.ema_names)
            method.export(output_dir / "final-ema")


# --------------------------------------------------------------------------------------------
# The loop


def train(
    method: Method,
    dataset: Dataset,
    config: TrainConfig,
    *,
    resume: bool | str | os.PathLike = False,
    progress: bool = True,
    run_config: Any | None = None,
) -> TrainResult:
    """Train ``method`` on ``dataset`` for ``config.max_steps`` optimizer steps.

    Trainable modules are put in train mode and frozen ones in eval mode, both on the device.

    Args:
        method: the algorithm (a :class:`~flowalign.training.method.Method`, or any object with its hooks).
        dataset: map-style dataset of dict items (``"index"`` is added as the position if absent).
        config: the loop's settings.
        resume: False = fresh run (refused if ``output_dir`` already has checkpoints); True = continue
            from the newest complete checkpoint in ``output_dir`` if there is one, else start fresh;
            a path = continue from that checkpoint folder.
        progress: show a progress bar (main process only).
        run_config: the full config (e.g. a method config nesting ``config``) saved as ``config.yaml``
            in ``output_dir`` and in each checkpoint; defaults to ``config``.

    Returns:
        A :class:`TrainResult`.

    Raises:
        TrainingDiverged: ``config.max_nan_steps_in_row`` consecutive non-finite steps.
        CheckpointError: the checkpoint to resume from is damaged (names the file).
        ValueError: inconsistent inputs (empty groups, dataset smaller than a global batch, ...).
    """
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise TypeError(
            "train() needs a map-style dataset with __len__ (deterministic order and exact resume)"
        )
    cfg = config
    output_dir = Path(cfg.output_dir)
    method_name = type(method).__name__
    if not isinstance(method, Method):
        method = _MethodAdapter(method)
    acc = _make_accelerator(cfg)
    strategy = dist_.resolve_strategy(acc)
    if cfg.mixed_precision == "fp16" and acc.device.type == "cpu":
        raise ValueError("mixed_precision='fp16' needs a CUDA device; on CPU use 'bf16' or 'no'")
    from accelerate.utils import set_seed

    run_cfg = config_to_dict(run_config if run_config is not None else cfg)
    ckpt_path = _resolve_start(acc, output_dir, resume)
    set_seed(cfg.seed, device_specific=True)
    run = _Run(method, method_name, cfg, acc, strategy)
    if ckpt_path is not None:
        ckpt = dcp_.load_verified(acc, ckpt_path)
        run.restore(ckpt)
        if acc.is_main_process and ckpt.config is not None and ckpt.config != run_cfg:
            logger.warning("resuming %s with a config that differs from its config.yaml", ckpt_path)
        del ckpt
    cursor = DataCursor(
        dataset,
        method.collate,
        seed=cfg.seed,
        micro_batch=cfg.batch_size,
        accum=cfg.grad_accum_steps,
        num_processes=acc.num_processes,
        process_index=acc.process_index,
        num_workers=cfg.num_workers,
        epoch=run.epoch,
        position=run.position,
        pin_memory=acc.device.type == "cuda",
    )
    metrics_path = output_dir / METRICS_FILE
    if acc.is_main_process:
        if ckpt_path is not None:
            _truncate_metrics(metrics_path, last_step=run.step)
        else:
            metrics_path.unlink(missing_ok=True)
        save_config(run_config if run_config is not None else cfg, output_dir / "config.yaml")
    if cfg.trackers:
        from flowalign.training.trackers import start_trackers

        start_trackers(acc, cfg, run_config if run_config is not None else cfg, output_dir)
    previews = Previews(method, cfg, acc, sharded=run.sharded) if cfg.validation is not None else None
    acc.wait_for_everyone()

    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.max_steps,
        initial=run.step,
        disable=not (progress and acc.is_main_process),
        desc="train",
        dynamic_ncols=True,
    )
    metrics_fh = open(metrics_path, "a", encoding="utf-8") if acc.is_main_process else None  # noqa: SIM115
    multi_group = len(run.groups) > 1
    last_ckpt: Path | None = None
    last_record: dict[str, Any] = {}
    interrupted = False
    t_last, steps_since = time.perf_counter(), 0
    try:
        with _sigterm_flag() as sigterm:
            while run.step < cfg.max_steps:
                record: dict[str, Any] = {"step": run.step + 1, "epoch": cursor.epoch}
                micro_batches = [to_device(b, acc.device) for b in cursor.next_step()]
                update = list(method.groups_to_update(run.step))
                if not update or any(g not in run.groups for g in update):
                    raise ValueError(
                        f"groups_to_update({run.step}) returned {update}; groups are {sorted(run.groups)}"
                    )
                skipped, stepped, stop = False, False, False
                for group in update:
                    values, group_stepped, group_skipped = run.update_group(group, micro_batches, sigterm)
                    stepped, skipped, stop = (
                        stepped or group_stepped,
                        skipped or group_skipped,
                        stop or values.pop("stop") > 0,
                    )
                    pre = f"{group}/" if multi_group else ""
                    record.update({f"{pre}{k}": _finite_or_none(v) for k, v in values.items()})
                run.nan_total += int(skipped)
                run.nan_in_row = run.nan_in_row + 1 if skipped else 0
                if run.ema is not None and stepped and (run.step + 1) % cfg.ema.every == 0:
                    run.ema.update(run.ema_modules(), decay=0.0 if run.step < cfg.ema.start_step else None)
                run.step += 1
                steps_since += 1
                record["skipped"] = skipped
                record["nan_skipped"] = run.nan_total
                loss_key = f"{update[0]}/loss" if multi_group else "loss"
                bar.update(1)
                if record.get(loss_key) is not None:
                    bar.set_postfix(loss=f"{record[loss_key]:.4g}", refresh=False)
                if run.step % cfg.log_every == 0 or skipped or run.step == cfg.max_steps:
                    last_record = record
                    if metrics_fh is not None:
                        metrics_fh.write(json.dumps(record) + "\n")
                        metrics_fh.flush()
                    if cfg.trackers:
                        now = time.perf_counter()
                        rate = steps_since * cursor.global_batch / max(now - t_last, 1e-9)
                        t_last, steps_since = now, 0
                        scalars = {
                            k: float(v)
                            for k, v in record.items()
                            if isinstance(v, int | float) and k != "step"
                        }
                        acc.log({**scalars, "samples_per_s": rate}, step=run.step)
                if run.nan_in_row >= cfg.max_nan_steps_in_row:
                    raise TrainingDiverged(
                        f"{run.nan_in_row} steps in a row had a non-finite loss or gradient norm (the last was step "
                        f"{run.step}, loss {record.get(loss_key)}; max_nan_steps_in_row={cfg.max_nan_steps_in_row}). "
                        "Those steps did not change the weights. Last checkpoint: "
                        f"{last_ckpt or find_latest_checkpoint(output_dir)}"
                    )
                interrupted = stop and run.step < cfg.max_steps
                periodic = cfg.checkpoint.every > 0 and run.step % cfg.checkpoint.every == 0
                if periodic or interrupted or run.step == cfg.max_steps:
                    last_ckpt = run.write_checkpoint(output_dir, cursor, run_cfg)
                if previews is not None:
                    previews.maybe_write(run.step)
                if interrupted:
                    break
    finally:
        bar.close()
        if metrics_fh is not None:
            metrics_fh.close()
        for tracker in acc.trackers:  # not acc.end_training(): that would destroy the process group
            tracker.finish()
        for module in run.wrapped.values():
            acc.unwrap_model(module, keep_fp32_wrapper=False)  # removes accelerate's autocast forward patch
        restore_offloaded(
            method.frozen_modules().values(), owner=method
        )  # train.offload_frozen: weights back on the CPU

    export_dir = None
    if not interrupted and run.step == cfg.max_steps:
        export_dir = output_dir / "final"
        if run.export_copies is not None:
            _export_sharded(run, method, output_dir)
        elif acc.is_main_process:
            method.export(export_dir)
            if run.ema is not None:
                with run.ema.swapped_in(run.ema_modules()):
                    method.export(output_dir / "final-ema")
        acc.wait_for_everyone()
    return TrainResult(
        step=run.step,
        output_dir=output_dir,
        checkpoint=last_ckpt,
        export_dir=export_dir,
        metrics=last_record,
        nan_skipped=run.nan_total,
        interrupted=interrupted,
    )
