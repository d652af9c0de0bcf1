"""Training: the one accelerate loop, the Method contract, checkpoints, EMA and caching (LoRA: ``flowalign.models.lora``).

Import from the submodules (``flowalign.training.loop``, ``.method``, ``.checkpoint``, ``.ema``,
``.cache``, ``.optim``, ``.batches``); the names below are re-exported lazily so ``import flowalign.training``
stays cheap.
"""

from __future__ import annotations

from flowalign import lazy_exports

_EXPORTS = {  # submodule -> the names it defines
    "loop": ("train", "TrainResult", "TrainingDiverged", "METRICS_FILE"),
    "optim": ("build_optimizer", "build_lr_scheduler"),
    "batches": ("DataCursor",),
    "method": ("Method", "StepContext"),
    "checkpoint": ("CheckpointError", "find_latest_checkpoint", "load_checkpoint"),
    "ema": ("EMA",),
    "cache": ("CachedDataset", "ensure_cache", "fingerprint_module"),
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
