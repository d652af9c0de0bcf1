"""Starting the experiment trackers of a run: a project, a run name, and the whole config as hyperparameters.

Trackers (tensorboard, wandb, ...) are accelerate's (``Accelerator(log_with=...)``). A run files itself
under ``train.tracker_project`` with ``train.run_name`` (the output folder's name by default), and
records every resolved config key as a flat ``section.key`` hyperparameter, so two runs can be compared
by their settings in the tracker's own table. Values that are not scalars (lists, null) are written as
their YAML-like text, since trackers accept only numbers, strings and booleans.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["flat_hyperparameters", "start_trackers"]


def flat_hyperparameters(config: Mapping[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """``{"train.optim.lr": 1e-4, ...}``: nested mappings flattened with dots, non-scalars as text."""
    out: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hyperparameters(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = "null" if value is None else str(value)
    return out


def start_trackers(acc: Any, cfg: Any, run_config: Any, output_dir: Path) -> None:
    """``acc.init_trackers`` with the project, the run name and the flattened ``run_config``."""
    from flowalign.config import config_to_dict

    name = cfg.run_name or Path(output_dir).resolve().name
    acc.init_trackers(
        cfg.tracker_project,
        config=flat_hyperparameters(config_to_dict(run_config)),
        init_kwargs={"wandb": {"name": name, "dir": str(output_dir)}},
    )
