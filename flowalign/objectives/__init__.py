"""Pure objectives: tensors in, per-sample loss and detached metrics out (no modules, configs or I/O)."""

from flowalign.objectives.flow_matching import (
    flow_matching_loss,
    per_sample_mse,
    time_loss_weight,
    velocity_error,
)

__all__ = [
    "flow_matching_loss",
    "per_sample_mse",
    "time_loss_weight",
    "velocity_error",
]
