"""The training loop's setup helpers: the accelerator, the resume decision, group checks, SIGTERM.

Used by :func:`flowalign.training.loop.train`; none of them runs a step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from flowalign.config import TrainConfig
from flowalign.training.checkpoint import find_latest_checkpoint, list_checkpoints, remove_stale_tmp_dirs
from flowalign.training.method import Method, StepContext

__all__ = [
    "MethodAdapter",
    "check_groups",
    "finite_or_none",
    "make_accelerator",
    "resolve_start",
    "sigterm_flag",
    "truncate_metrics",
]

logger = logging.getLogger(__name__)


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


class MethodAdapter(Method):
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


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def truncate_metrics(path: Path, *, last_step: int) -> None:
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


def make_accelerator(cfg: TrainConfig) -> Any:
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
def sigterm_flag() -> Iterator[list[bool]]:
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


def check_groups(groups: dict[str, list[nn.Parameter]], modules: Mapping[str, nn.Module]) -> None:
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


def resolve_start(acc: Any, output_dir: Path, resume: bool | str | os.PathLike) -> str | None:
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
