"""The state of one training run and its per-step work: one optimizer step, restore, checkpoint, export.

:class:`RunState` holds the modules, optimizers, schedulers, EMA and counters of one
:func:`flowalign.training.loop.train` call; ``train_step`` does step 2 and 3 of the loop's contract
(see ``flowalign.training.loop``) up to the metrics record.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowalign.config import TrainConfig
from flowalign.training import dcp_checkpoint as dcp_
from flowalign.training import deepspeed_engines as ds_
from flowalign.training import distributed as dist_
from flowalign.training.batches import DataCursor, to_device
from flowalign.training.checkpoint import (
    Checkpoint,
    capture_rng_state,
    load_trainable_state_dict,
    restore_rng_state,
    save_checkpoint,
)
from flowalign.training.ema import EMA
from flowalign.training.loop_setup import check_groups, finite_or_none
from flowalign.training.memory import enable_gradient_checkpointing
from flowalign.training.method import Method, StepContext
from flowalign.training.offload import place_frozen
from flowalign.training.optim import build_lr_scheduler, build_optimizer
from flowalign.training.savers import enable_run_vae_savers
from flowalign.training.speed import apply_speed_switches

__all__ = ["RunState", "export_sharded"]

logger = logging.getLogger(__name__)


class RunState:
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
        place_frozen(
            frozen, self.trainable, self.device, offload=offload, sharded=sharded, owner=method,
            keep_for_sharding=strategy == dist_.FSDP2,
        )  # fmt: skip
        apply_speed_switches(
            self.trainable,
            method.frozen_modules().values(),
            compile=cfg.compile,
            compile_backend=cfg.compile_backend,
            attention_backend=cfg.attention_backend,
        )
        self.groups = dict(method.optimizer_groups())
        check_groups(self.groups, self.trainable)
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

    def train_step(self, cursor: DataCursor, stop_flag: list[bool]) -> tuple[dict[str, Any], bool, bool, str]:
        """One optimizer step of every group ``groups_to_update`` names, then the NaN counters and EMA.

        Returns (record, skipped, stop, loss_key): the step's metrics record (keys prefixed ``group/``
        when there are several groups), whether a group skipped its step for a non-finite loss or
        norm, whether any process got SIGTERM, and the record's key of the first group's loss."""
        record: dict[str, Any] = {"step": self.step + 1, "epoch": cursor.epoch}
        micro_batches = [to_device(b, self.acc.device) for b in cursor.next_step()]
        update = list(self.method.groups_to_update(self.step))
        if not update or any(g not in self.groups for g in update):
            raise ValueError(
                f"groups_to_update({self.step}) returned {update}; groups are {sorted(self.groups)}"
            )
        multi_group = len(self.groups) > 1
        skipped, stepped, stop = False, False, False
        for group in update:
            values, group_stepped, group_skipped = self.update_group(group, micro_batches, stop_flag)
            stepped, skipped, stop = (
                stepped or group_stepped,
                skipped or group_skipped,
                stop or values.pop("stop") > 0,
            )
            pre = f"{group}/" if multi_group else ""
            record.update({f"{pre}{k}": finite_or_none(v) for k, v in values.items()})
        self.nan_total += int(skipped)
        self.nan_in_row = self.nan_in_row + 1 if skipped else 0
        ema_cfg = self.cfg.ema
        if self.ema is not None and stepped and (self.step + 1) % ema_cfg.every == 0:
            self.ema.update(self.ema_modules(), decay=0.0 if self.step < ema_cfg.start_step else None)
        self.step += 1
        record["skipped"] = skipped
        record["nan_skipped"] = self.nan_total
        return record, skipped, stop, f"{update[0]}/loss" if multi_group else "loss"

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


def export_sharded(run: RunState, method: Method, output_dir: Path) -> None:
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
