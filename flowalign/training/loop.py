"""The one training loop: accelerate, accumulate, clip, step, EMA, log, checkpoint, resume.

``train(method, dataset, config)`` runs any :class:`~flowalign.training.method.Method`. Per step:

1. take the next global batch from a seeded per-epoch permutation of the dataset (the same
   order for any process count); process p, micro-step k gets positions
   ``[(k * P + p) * B, (k * P + p + 1) * B)`` of it;
2. for each group in ``method.groups_to_update(step)``: ``compute_loss`` on each micro-batch
   under autocast, backward of ``loss / grad_accum_steps`` (DDP syncs on the last micro-step),
   mean loss/metrics over micro-batches and processes, clip the group's gradient norm, and
   ``optimizer.step()`` unless the loss or the norm is not finite (then the step is skipped and
   counted; ``max_nan_steps_in_row`` skipped steps in a row raise :class:`TrainingDiverged`);
   the LR schedule advances on every step, skipped or not;
3. EMA update, metrics to ``metrics.jsonl`` + trackers, periodic checkpoint.

SIGTERM finishes the current step, writes a checkpoint and returns (``interrupted=True``).
Resuming restores weights, EMA, optimizer/scheduler/RNG state, method state and the data cursor,
and truncates ``metrics.jsonl`` to the resumed step, so N steps straight and N/2 + resume + N/2
produce identical weights and logs.
"""

from __future__ import annotations

import contextlib
import functools
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
from torch.utils.data import DataLoader, Dataset, IterableDataset

from flowalign.config import OptimConfig, TrainConfig, config_to_dict, save_config
from flowalign.training.checkpoint import (
    capture_rng_state,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_trainable_state_dict,
    remove_stale_tmp_dirs,
    restore_rng_state,
    save_checkpoint,
)
from flowalign.training.ema import EMA
from flowalign.training.method import Method, StepContext, sample_seed

__all__ = [
    "METRICS_FILE",
    "TrainResult",
    "TrainingDiverged",
    "build_lr_scheduler",
    "build_optimizer",
    "lr_multiplier",
    "train",
]

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
# Optimizer and schedule


def build_optimizer(
    params: list[nn.Parameter], cfg: OptimConfig, *, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over ``params`` with ``cfg``; fused kernel on CUDA when ``cfg.fused`` is None."""
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
        eps=cfg.eps,
        fused=fused or None,
    )


def lr_multiplier(step: int, *, schedule: str, warmup_steps: int, max_steps: int) -> float:
    """LR factor at ``step`` (0-based): linear warm-up step / warmup_steps, then

    constant: 1;  linear: (max_steps - step) / (max_steps - warmup_steps);
    cosine: 0.5 (1 + cos(pi (step - warmup_steps) / (max_steps - warmup_steps)))   (never below 0).
    The same curves as diffusers.optimization's constant_with_warmup / linear / cosine schedules.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown LR schedule {schedule!r}; expected constant, linear or cosine")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` following :func:`lr_multiplier` (stepped once per optimizer step, skipped or not)."""
    fn = functools.partial(
        lr_multiplier, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, max_steps=max_steps
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# --------------------------------------------------------------------------------------------
# Data


class _Indexed(Dataset):
    """Checks items are dicts and gives each one its dataset position as ``"index"`` if it has none."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        if not isinstance(item, Mapping):
            raise TypeError(
                f"dataset item {i} is a {type(item).__name__}; training datasets must return dicts"
            )
        if "index" not in item:
            return {**item, "index": i}
        index = item["index"]
        if isinstance(index, Tensor) and index.ndim == 0 and not index.is_floating_point():
            index = int(index)
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(
                f"dataset item {i}: 'index' must be an int (used to seed per-sample noise), got {index!r}"
            )
        return dict(item) if not isinstance(item, dict) else item


class _DataCursor:
    """Deterministic global batches: a seeded permutation per epoch, cut into global batches
    (incomplete tail dropped); this process reads its micro-batches of each."""

    def __init__(
        self,
        dataset: Dataset,
        collate: Any,
        *,
        seed: int,
        micro_batch: int,
        accum: int,
        num_processes: int,
        process_index: int,
        num_workers: int,
        epoch: int = 0,
        position: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = _Indexed(dataset)
        self.collate = collate
        self.seed = seed
        self.micro_batch = micro_batch
        self.accum = accum
        self.num_processes = num_processes
        self.process_index = process_index
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.global_batch = micro_batch * accum * num_processes
        self.n = len(self.dataset)
        if self.n < self.global_batch:
            raise ValueError(
                f"dataset has {self.n} items, fewer than one global batch of {self.global_batch} "
                f"(batch_size {micro_batch} x grad_accum_steps {accum} x {num_processes} processes)"
            )
        self.epoch, self.position = epoch, position
        self._iter: Iterator | None = None
        self._normalise()

    def _normalise(self) -> None:
        if self.position + self.global_batch > self.n:
            self.epoch, self.position, self._iter = self.epoch + 1, 0, None

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, "data", "order", 0))
        return torch.randperm(self.n, generator=g).tolist()

    def _open(self) -> Iterator:
        order = self.order(self.epoch)
        batches = []
        for start in range(self.position, self.n - self.global_batch + 1, self.global_batch):
            for k in range(self.accum):
                lo = start + (k * self.num_processes + self.process_index) * self.micro_batch
                batches.append(order[lo : lo + self.micro_batch])
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # an explicit generator keeps DataLoader from drawing from the global torch RNG
            generator=torch.Generator().manual_seed(
                sample_seed(self.seed, self.epoch, "data", "workers", self.position)
            ),
        )
        return iter(loader)

    def next_step(self) -> list[dict]:
        """This process's ``accum`` micro-batches of the next global batch; advances the cursor."""
        if self._iter is None:
            self._iter = self._open()
        micro = [next(self._iter) for _ in range(self.accum)]
        self.position += self.global_batch
        self._normalise()
        return micro

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "global_batch_size": self.global_batch}


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------
# Metrics file


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _truncate_metrics(path: Path, *, last_step: int) -> None:
    """Keep only records with step <= last_step (and drop a torn last line)."""
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


# --------------------------------------------------------------------------------------------
# Helpers


def _hook(method: Any, name: str) -> Any:
    """``method.<name>`` or Method's default implementation (duck-typed methods need not subclass)."""
    bound = getattr(method, name, None)
    if bound is not None:
        return bound
    return getattr(Method, name).__get__(method)


def _make_accelerator(cfg: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    # The accelerate state is a per-process singleton; a second train() in one process (tests,
    # notebooks) with another precision would be refused without this reset. The process group
    # (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=cfg.cpu,
        log_with=list(cfg.trackers) or None,
        project_dir=str(cfg.output_dir),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp_find_unused_parameters)
        ],
    )


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[list[bool]]:
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
                    f"trainable parameter {mname}.{pname} is in no optimizer group; freeze it or add it to one"
                )


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

    Args:
        method: the algorithm (see :class:`~flowalign.training.method.Method`).
        dataset: map-style dataset of dict items (``"index"`` is added as the position if absent).
        config: the loop's settings.
        resume: False = fresh run (refused if ``output_dir`` already has checkpoints); True = continue
            from the newest complete checkpoint in ``output_dir`` if there is one, else start fresh;
            a path = continue from that checkpoint folder.
        progress: show a progress bar (main process only).
        run_config: the full config (e.g. a method config nesting ``config``) to save with each
            checkpoint as ``config.yaml``; defaults to ``config``.

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
    acc = _make_accelerator(cfg)
    from accelerate.utils import broadcast_object_list, gather_object, set_seed

    is_main = acc.is_main_process
    device = acc.device
    world, rank = acc.num_processes, acc.process_index
    run_cfg_dict = config_to_dict(run_config if run_config is not None else cfg)

    # ---- where to start
    ckpt_path: str | None = None
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp_dirs(output_dir)
        if resume is False:
            existing = list_checkpoints(output_dir)
            if existing:
                ckpt_path = f"ERROR:{output_dir} already holds checkpoints ({existing[-1].name}, ...); pass resume=True to continue it or choose a new output_dir"
        elif resume is True:
            latest = find_latest_checkpoint(output_dir)
            ckpt_path = str(latest) if latest else None
        else:
            ckpt_path = str(Path(resume))
    ckpt_path = broadcast_object_list([ckpt_path])[0]
    if ckpt_path is not None and ckpt_path.startswith("ERROR:"):
        raise ValueError(ckpt_path[len("ERROR:") :])

    set_seed(cfg.seed, device_specific=True)

    # ---- modules, groups, optimizers
    trainable = dict(_hook(method, "trainable_modules")())
    if not trainable:
        raise ValueError(f"{type(method).__name__}.trainable_modules() returned no modules")
    for name, module in trainable.items():
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"trainable module {name!r} has no parameter with requires_grad=True")
        if cfg.gradient_checkpointing:
            if not hasattr(module, "enable_gradient_checkpointing"):
                raise ValueError(
                    f"gradient_checkpointing=True but trainable module {name!r} ({type(module).__name__}) "
                    "has no enable_gradient_checkpointing()"
                )
            module.enable_gradient_checkpointing()
    for module in _hook(method, "frozen_modules")().values():
        module.to(device)
    wrapped = {name: acc.prepare_model(module) for name, module in trainable.items()}
    groups = dict(_hook(method, "optimizer_groups")())
    _check_groups(groups, trainable)
    group_cfgs = {g: _hook(method, "optim_config")(g, cfg.optim) for g in groups}
    optimizers = {
        g: acc.prepare_optimizer(build_optimizer(ps, group_cfgs[g], device=device))
        for g, ps in groups.items()
    }
    schedulers = {
        g: build_lr_scheduler(opt.optimizer, group_cfgs[g], max_steps=cfg.max_steps)
        for g, opt in optimizers.items()
    }
    ema_names = list(_hook(method, "ema_modules")()) if cfg.ema.use else []
    ema = EMA({n: trainable[n] for n in ema_names}, decay=cfg.ema.decay) if cfg.ema.use else None
    prefix_groups = len(groups) > 1

    # ---- resume
    start_step, epoch, position, nan_total, nan_in_row = 0, 0, 0, 0, 0
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        for name, module in trainable.items():
            if name not in ckpt.weights:
                raise ValueError(
                    f"{ckpt_path}: no weights for trainable module {name!r} (has {sorted(ckpt.weights)})"
                )
            load_trainable_state_dict(
                module, ckpt.weights[name], source=f"{ckpt_path}/model-{name}.safetensors"
            )
        if ema is not None:
            if ckpt.ema is None:
                raise ValueError(f"{ckpt_path}: EMA is on but the checkpoint has no ema.safetensors")
            ema.load_state_dict(ckpt.ema)
        for g, opt in optimizers.items():
            if g not in ckpt.optimizers or g not in ckpt.schedulers:
                raise ValueError(f"{ckpt_path}: no optimizer/scheduler state for group {g!r}")
            opt.load_state_dict(ckpt.optimizers[g])
            schedulers[g].load_state_dict(ckpt.schedulers[g])
        if rank < len(ckpt.rng_states):
            restore_rng_state(ckpt.rng_states[rank])
        else:
            logger.warning(
                "checkpoint has RNG states for %d processes; process %d keeps a fresh seed",
                len(ckpt.rng_states),
                rank,
            )
        _hook(method, "load_state_dict")(ckpt.method_state)
        if acc.scaler is not None and ckpt.state.get("grad_scaler"):
            acc.scaler.load_state_dict(ckpt.state["grad_scaler"])
        start_step = int(ckpt.step)
        epoch, position = int(ckpt.state["epoch"]), int(ckpt.state["position"])
        nan_total, nan_in_row = int(ckpt.state.get("nan_skipped", 0)), int(ckpt.state.get("nan_in_row", 0))
        if ckpt.config is not None and ckpt.config != run_cfg_dict and is_main:
            logger.warning(
                "resuming %s with a config that differs from the checkpoint's config.yaml", ckpt_path
            )
        del ckpt

    cursor = _DataCursor(
        dataset,
        _hook(method, "collate"),
        seed=cfg.seed,
        micro_batch=cfg.batch_size,
        accum=cfg.grad_accum_steps,
        num_processes=world,
        process_index=rank,
        num_workers=cfg.num_workers,
        epoch=epoch,
        position=position,
        pin_memory=device.type == "cuda",
    )

    metrics_path = output_dir / METRICS_FILE
    if is_main:
        if ckpt_path is not None:
            _truncate_metrics(metrics_path, last_step=start_step)
        else:
            metrics_path.unlink(missing_ok=True)
        save_config(run_config if run_config is not None else cfg, output_dir / "config.yaml")
    if cfg.trackers:
        acc.init_trackers("logs")
    acc.wait_for_everyone()

    # ---- state for checkpointing
    last_ckpt: Path | None = None
    last_record: dict[str, Any] = {}

    def write_checkpoint(step_done: int) -> Path:
        rng_states = gather_object([capture_rng_state()])
        path: list[Any] = [None]
        if is_main:
            state = {
                **cursor.state(),
                "nan_skipped": nan_total,
                "nan_in_row": nan_in_row,
                "num_processes": world,
                "grad_scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            }
            path[0] = str(
                save_checkpoint(
                    output_dir,
                    step_done,
                    modules=trainable,
                    optimizers={g: opt.state_dict() for g, opt in optimizers.items()},
                    schedulers={g: s.state_dict() for g, s in schedulers.items()},
                    state=state,
                    rng_states=rng_states,
                    ema=ema.state_dict() if ema is not None else None,
                    method_state=_hook(method, "state_dict")(),
                    config=run_cfg_dict,
                    keep_last=cfg.checkpoint.keep_last,
                )
            )
        path = broadcast_object_list(path)
        return Path(path[0])

    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.max_steps,
        initial=start_step,
        disable=not (progress and is_main),
        desc="train",
        dynamic_ncols=True,
    )
    metrics_fh = open(metrics_path, "a", encoding="utf-8") if is_main else None  # noqa: SIM115
    ddp_modules = [w for w in wrapped.values() if isinstance(w, nn.parallel.DistributedDataParallel)]
    all_groups = set(groups)
    step = start_step
    interrupted = False
    t_last, steps_since = time.perf_counter(), 0
    try:
        with _sigterm_flag() as sigterm:
            while step < cfg.max_steps:
                batch_epoch = cursor.epoch
                micro_batches = [_to_device(b, device) for b in cursor.next_step()]
                update = list(_hook(method, "groups_to_update")(step))
                unknown = [g for g in update if g not in all_groups]
                if unknown or not update:
                    raise ValueError(
                        f"groups_to_update({step}) returned {update}; groups are {sorted(all_groups)}"
                    )
                record: dict[str, Any] = {"step": step + 1, "epoch": batch_epoch}
                skipped_nan = False
                stop_votes = 0.0
                stepped_any = False
                for group in update:
                    opt, params = optimizers[group], groups[group]
                    opt.zero_grad(set_to_none=True)
                    losses: list[Tensor] = []
                    sums: dict[str, Tensor] = {}
                    for k, batch in enumerate(micro_batches):
                        ctx = StepContext(
                            step=step,
                            seed=cfg.seed,
                            group=group,
                            micro_step=k,
                            process_index=rank,
                            num_processes=world,
                            device=device,
                            mixed_precision=cfg.mixed_precision,
                            modules=wrapped,
                        )
                        last = k == len(micro_batches) - 1
                        with contextlib.ExitStack() as stack:
                            if not last:
                                for w in ddp_modules:
                                    stack.enter_context(acc.no_sync(w))
                            with acc.autocast():
                                loss, metrics = method.compute_loss(batch, ctx, group)
                            if not isinstance(loss, Tensor) or loss.ndim != 0:
                                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                                raise ValueError(
                                    f"{type(method).__name__}.compute_loss(group={group!r}) must return a scalar "
                                    f"loss (the micro-batch mean), got {shape}"
                                )
                            if not loss.requires_grad:
                                raise ValueError(
                                    f"{type(method).__name__}.compute_loss(group={group!r}) returned a loss "
                                    "without gradient (no trainable parameter reached it)"
                                )
                            acc.backward(loss / len(micro_batches))
                        losses.append(loss.detach().float())
                        for key, value in metrics.items():
                            v = (
                                value.detach().float().mean()
                                if isinstance(value, Tensor)
                                else torch.tensor(float(value))
                            )
                            sums[key] = sums.get(key, torch.zeros((), device=device)) + v.to(device)
                    keys = sorted(sums)
                    local = torch.stack(
                        [torch.stack(losses).mean()]
                        + [sums[key] / len(micro_batches) for key in keys]
                        + [torch.tensor(float(sigterm[0]), device=device)]
                    )
                    reduced = acc.reduce(local, reduction="mean") if world > 1 else local
                    values = reduced.tolist()
                    loss_value, stop_votes = values[0], max(stop_votes, values[-1])
                    acc.unscale_gradients(optimizer=opt)
                    max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
                    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                    lr = schedulers[group].get_last_lr()[0]
                    finite = math.isfinite(loss_value) and math.isfinite(norm)
                    overflow = (
                        acc.scaler is not None and math.isfinite(loss_value) and not math.isfinite(norm)
                    )
                    if finite or overflow:
                        opt.step()  # with fp16 the grad scaler skips an overflowing step and lowers its scale
                        stepped_any = stepped_any or not getattr(opt, "step_was_skipped", False)
                    else:
                        skipped_nan = True
                    opt.zero_grad(set_to_none=True)
                    with warnings.catch_warnings():
                        # the schedule follows the step count, skipped steps included; torch warns when
                        # the very first optimizer step was skipped, which is intended here
                        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                        schedulers[group].step()
                    pre = f"{group}/" if prefix_groups else ""
                    record[f"{pre}loss"] = _finite_or_none(loss_value)
                    record[f"{pre}grad_norm"] = _finite_or_none(norm)
                    record[f"{pre}lr"] = lr
                    for key, value in zip(keys, values[1:-1], strict=True):
                        record[f"{pre}{key}"] = _finite_or_none(value)
                if skipped_nan:
                    nan_total, nan_in_row = nan_total + 1, nan_in_row + 1
                else:
                    nan_in_row = 0
                if ema is not None and stepped_any and (step + 1) % cfg.ema.every == 0:
                    ema.update(
                        {n: trainable[n] for n in ema_names}, decay=0.0 if step < cfg.ema.start_step else None
                    )
                step += 1
                steps_since += 1
                record["skipped"] = skipped_nan
                record["nan_skipped"] = nan_total
                bar.update(1)
                loss_key = f"{update[0]}/loss" if prefix_groups else "loss"
                if record.get(loss_key) is not None:
                    bar.set_postfix(loss=f"{record[loss_key]:.4g}", refresh=False)
                if step % cfg.log_every == 0 or skipped_nan or step == cfg.max_steps:
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
                        acc.log({**scalars, "samples_per_s": rate}, step=step)
                if nan_in_row >= cfg.max_nan_steps_in_row:
                    raise TrainingDiverged(
                        f"{nan_in_row} steps in a row had a non-finite loss or gradient norm (last at step {step}, "
                        f"loss {record.get(loss_key)}, max_nan_steps_in_row={cfg.max_nan_steps_in_row}); "
                        f"weights were not updated by those steps; last checkpoint: {last_ckpt or find_latest_checkpoint(output_dir)}"
                    )
                interrupted = stop_votes > 0 and step < cfg.max_steps
                periodic = cfg.checkpoint.every > 0 and step % cfg.checkpoint.every == 0
                if periodic or interrupted or step == cfg.max_steps:
                    last_ckpt = write_checkpoint(step)
                if interrupted:
                    break
    finally:
        bar.close()
        if metrics_fh is not None:
            metrics_fh.close()
        for tracker in acc.trackers:
            tracker.finish()
        for module in wrapped.values():
            acc.unwrap_model(module, keep_fp32_wrapper=False)  # removes accelerate's autocast forward patch

    export_dir = None
    if not interrupted and step == cfg.max_steps:
        export_dir = output_dir / "final"
        if is_main:
            _hook(method, "export")(export_dir)
            if ema is not None:
                with ema.swapped_in({n: trainable[n] for n in ema_names}):
                    _hook(method, "export")(output_dir / "final-ema")
        acc.wait_for_everyone()
    return TrainResult(
        step=step,
        output_dir=output_dir,
        checkpoint=last_ckpt,
        export_dir=export_dir,
        metrics=last_record,
        nan_skipped=nan_total,
        interrupted=interrupted,
    )
