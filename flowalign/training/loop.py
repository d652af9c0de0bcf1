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

The setup helpers (accelerator, resume decision, group checks, SIGTERM flag) are in
``flowalign.training.loop_setup``; the run state and one optimizer step in ``flowalign.training.loop_state``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, IterableDataset

from flowalign.config import TrainConfig, config_to_dict, save_config
from flowalign.training import dcp_checkpoint as dcp_
from flowalign.training import distributed as dist_
from flowalign.training.batches import DataCursor
from flowalign.training.checkpoint import find_latest_checkpoint
from flowalign.training.loop_setup import (
    MethodAdapter,
    make_accelerator,
    resolve_start,
    sigterm_flag,
    truncate_metrics,
)
from flowalign.training.loop_state import RunState, export_sharded
from flowalign.training.method import Method
from flowalign.training.offload import restore_offloaded
from flowalign.training.previews import Previews

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


class _StepLog:
    """The progress bar, ``metrics.jsonl`` and the trackers of one run (files on the main process only)."""

    def __init__(self, acc: Any, cfg: TrainConfig, path: Path, *, initial: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        self.acc, self.cfg = acc, cfg
        self.bar = tqdm(
            total=cfg.max_steps,
            initial=initial,
            disable=not (progress and acc.is_main_process),
            desc="train",
            dynamic_ncols=True,
        )
        self.fh = open(path, "a", encoding="utf-8") if acc.is_main_process else None  # noqa: SIM115
        self.last: dict[str, Any] = {}
        self.t_last, self.steps_since = time.perf_counter(), 0

    def step(
        self, record: dict[str, Any], step: int, *, skipped: bool, loss_key: str, global_batch: int
    ) -> None:
        """Advance the bar; log every ``log_every`` steps, on skipped steps and on the last one."""
        cfg = self.cfg
        self.steps_since += 1
        self.bar.update(1)
        if record.get(loss_key) is not None:
            self.bar.set_postfix(loss=f"{record[loss_key]:.4g}", refresh=False)
        if not (step % cfg.log_every == 0 or skipped or step == cfg.max_steps):
            return
        self.last = record
        if self.fh is not None:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()
        if cfg.trackers:
            now = time.perf_counter()
            rate = self.steps_since * global_batch / max(now - self.t_last, 1e-9)
            self.t_last, self.steps_since = now, 0
            scalars = {k: float(v) for k, v in record.items() if isinstance(v, int | float) and k != "step"}
            self.acc.log({**scalars, "samples_per_s": rate}, step=step)

    def close(self) -> None:
        self.bar.close()
        if self.fh is not None:
            self.fh.close()


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
    cfg, output_dir = config, Path(config.output_dir)
    method_name = type(method).__name__
    if not isinstance(method, Method):
        method = MethodAdapter(method)
    acc = make_accelerator(cfg)
    strategy = dist_.resolve_strategy(acc)
    if cfg.mixed_precision == "fp16" and acc.device.type == "cpu":
        raise ValueError("mixed_precision='fp16' needs a CUDA device; on CPU use 'bf16' or 'no'")
    full_cfg = run_config if run_config is not None else cfg
    run, cursor, run_cfg = _start(method, method_name, dataset, cfg, acc, strategy, resume, full_cfg)
    previews = Previews(method, cfg, acc, sharded=run.sharded) if cfg.validation is not None else None
    acc.wait_for_everyone()
    log = _StepLog(acc, cfg, output_dir / METRICS_FILE, initial=run.step, progress=progress)
    try:
        last_ckpt, interrupted = _run_steps(run, cursor, log, previews, run_cfg)
    finally:
        log.close()
        for tracker in acc.trackers:  # not acc.end_training(): that would destroy the process group
            tracker.finish()
        for module in run.wrapped.values():
            acc.unwrap_model(module, keep_fp32_wrapper=False)  # removes accelerate's autocast forward patch
        # train.offload_frozen: weights back on the CPU
        restore_offloaded(method.frozen_modules().values(), owner=method)
    export_dir = None
    if not interrupted and run.step == cfg.max_steps:
        export_dir = _export(run, method, output_dir)
    return TrainResult(
        step=run.step,
        output_dir=output_dir,
        checkpoint=last_ckpt,
        export_dir=export_dir,
        metrics=log.last,
        nan_skipped=run.nan_total,
        interrupted=interrupted,
    )


def _start(
    method: Method,
    method_name: str,
    dataset: Dataset,
    cfg: TrainConfig,
    acc: Any,
    strategy: str,
    resume: bool | str | os.PathLike,
    full_cfg: Any,
) -> tuple[RunState, DataCursor, dict]:
    """Seed, build the run state (restored from the checkpoint to resume from, if any), the data
    cursor, and prepare the run folder: ``config.yaml``, ``metrics.jsonl`` cut to the resumed step, trackers."""
    from accelerate.utils import set_seed

    output_dir = Path(cfg.output_dir)
    run_cfg = config_to_dict(full_cfg)
    ckpt_path = resolve_start(acc, output_dir, resume)
    set_seed(cfg.seed, device_specific=True)
    run = RunState(method, method_name, cfg, acc, strategy)
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
            truncate_metrics(metrics_path, last_step=run.step)
        else:
            metrics_path.unlink(missing_ok=True)
        save_config(full_cfg, output_dir / "config.yaml")
    if cfg.trackers:
        from flowalign.training.trackers import start_trackers

        start_trackers(acc, cfg, full_cfg, output_dir)
    return run, cursor, run_cfg


def _run_steps(
    run: RunState, cursor: DataCursor, log: _StepLog, previews: Previews | None, run_cfg: dict
) -> tuple[Path | None, bool]:
    """Steps until ``max_steps`` or SIGTERM, with the NaN guard and the checkpoint policy.
    Returns (the last checkpoint written, interrupted)."""
    cfg, output_dir = run.cfg, Path(run.cfg.output_dir)
    last_ckpt: Path | None = None
    interrupted = False
    with sigterm_flag() as sigterm:
        while run.step < cfg.max_steps:
            record, skipped, stop, loss_key = run.train_step(cursor, sigterm)
            log.step(record, run.step, skipped=skipped, loss_key=loss_key, global_batch=cursor.global_batch)
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
    return last_ckpt, interrupted


def _export(run: RunState, method: Method, output_dir: Path) -> Path:
    """``method.export`` of the final weights to ``output_dir/final`` (EMA weights to ``final-ema``)."""
    export_dir = output_dir / "final"
    if run.export_copies is not None:
        export_sharded(run, method, output_dir)
    elif run.acc.is_main_process:
        method.export(export_dir)
        if run.ema is not None:
            with run.ema.swapped_in(run.ema_modules()):
                method.export(output_dir / "final-ema")
    run.acc.wait_for_everyone()
    return export_dir
