"""Evaluation: generate or read samples, score them, and report per-dimension statistics, win rates,
diversity, FID, drift and calibration as ``report.json`` + a self-contained ``report.html``.

    from flowalign.evals import run_eval
    result = run_eval({"base": "ckpt/base", "dpo": "ckpt/dpo"}, "toy-heldout@32", ["toy"],
                      samples_per_prompt=4, seeds=[0], out_dir="eval/run1")

Names are imported on first use, so ``flowalign.evals.stats`` stays light for callers that only need it.
"""

from __future__ import annotations

from flowalign import lazy_exports

_EXPORTS = {  # submodule -> the names it defines
    "types": ("EvalOptions", "ModelSpec"),
    "runner": ("EvalResult", "run_eval", "rerun_eval"),
    "samples": ("parse_model_spec", "sweep_guidance"),
    "prompt_sets": ("PromptSet", "builtin_prompt_sets", "load_prompt_set"),
    "report": ("load_report", "render_report"),
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
