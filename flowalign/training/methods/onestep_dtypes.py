"""The dtype policy of the one-step runs (f-distill, Diff-Instruct*), as ``flowalign.training.runs`` has it
for the other methods: the frozen teacher in the compute dtype of ``train.mixed_precision``, every
trainable network (generator, fake score, discriminator heads, LoRA adapters) in fp32, copied from the
teacher's transformer read in fp32."""

from __future__ import annotations

from pathlib import Path

import torch

from flowalign.config import ConfigError
from flowalign.models.base import FlowModel
from flowalign.training.methods.onestep_common import TEACHER_DTYPES, load_teacher

__all__ = ["frozen_dtype", "load_run_teacher"]


def frozen_dtype(teacher_dtype: str | None, mixed_precision: str) -> torch.dtype:
    """The frozen teacher's dtype in a one-step run: ``teacher_dtype`` if set, else the compute dtype of
    ``train.mixed_precision`` (no/bf16/fp16 -> fp32/bf16/fp16), the dtype policy of every run."""
    if teacher_dtype is not None:
        if teacher_dtype not in TEACHER_DTYPES:
            raise ConfigError(
                f"must be one of {sorted(TEACHER_DTYPES)}, got {teacher_dtype!r}", key="teacher_dtype"
            )
        return TEACHER_DTYPES[teacher_dtype]
    compute = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}.get(mixed_precision)
    if compute is None:
        raise ConfigError(f"must be no, bf16 or fp16, got {mixed_precision!r}", key="train.mixed_precision")
    return TEACHER_DTYPES[compute]


def load_run_teacher(
    path_or_id: str | Path, *, method: str, frozen: torch.dtype, device: torch.device
) -> FlowModel:
    """The teacher of a one-step run on ``device``: its frozen components (text encoders, VAE) in
    ``frozen``, its transformer in fp32, since the trainable generator and fake score are copied from
    it; :meth:`OneStepDistillation.keep_teacher_in` then casts the frozen transformer to ``frozen``."""
    dtypes = {"default": frozen, "transformer": torch.float32}
    return load_teacher(path_or_id, method=method, dtype=dtypes, device=device)
