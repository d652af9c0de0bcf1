"""Training: the one accelerate loop, the Method contract, checkpoints, EMA and caching (LoRA: ``flowalign.models.lora``).

Import from the submodules (``flowalign.training.loop``, ``.method``, ``.checkpoint``, ``.ema``,
``.cache``, ``.optim``, ``.batches``); the names below are re-exported lazily so ``import flowalign.training``
stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train": "loop",
    "TrainResult": "loop",
    "TrainingDiverged": "loop",
    "METRICS_FILE": "loop",
    "build_optimizer": "optim",
    "build_lr_scheduler": "optim",
    "DataCursor": "batches",
    "Method": "method",
    "StepContext": "method",
    "CheckpointError": "checkpoint",
    "find_latest_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "EMA": "ema",
    "CachedDataset": "cache",
    "ensure_cache": "cache",
    "fingerprint_module": "cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"flowalign.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'flowalign.training' has no attribute {name!r}")
