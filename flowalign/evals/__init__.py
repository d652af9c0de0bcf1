"""Evaluation: generate or read samples, score them, and report per-dimension statistics, win rates,
diversity, FID, drift and calibration as ``report.json`` + a self-contained ``report.html``.

    from flowalign.evals import run_eval
    result = run_eval({"base": "ckpt/base", "dpo": "ckpt/dpo"}, "toy-heldout@32", ["toy"],
                      samples_per_prompt=4, seeds=[0], out_dir="eval/run1")

Names are imported on first use, so ``flowalign.evals.stats`` stays light for callers that only need it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalOptions": "flowalign.evals.types",
    "EvalResult": "flowalign.evals.runner",
    "ModelSpec": "flowalign.evals.types",
    "parse_model_spec": "flowalign.evals.samples",
    "sweep_guidance": "flowalign.evals.samples",
    "run_eval": "flowalign.evals.runner",
    "rerun_eval": "flowalign.evals.runner",
    "PromptSet": "flowalign.evals.prompt_sets",
    "builtin_prompt_sets": "flowalign.evals.prompt_sets",
    "load_prompt_set": "flowalign.evals.prompt_sets",
    "load_report": "flowalign.evals.report",
    "render_report": "flowalign.evals.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flowalign.evals' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
