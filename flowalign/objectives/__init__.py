"""Pure objectives: tensors in, per-sample loss and detached metrics out (no modules, configs or I/O)."""

from flowalign.objectives.bt_ties import (
    BTTProbabilities,
    btt_loss,
    btt_probabilities,
    pairwise_accuracy,
    tie_calibrated_accuracy,
)
from flowalign.objectives.dpo import (
    check_shared_pair_noise,
    diffusion_dpo_loss,
    dpo_inside,
    flow_dpo_beta,
    flow_dpo_loss,
    split_pairs,
    velocity_errors_for_pairs,
)
from flowalign.objectives.flow_matching import (
    flow_matching_loss,
    per_sample_mse,
    time_loss_weight,
    velocity_error,
)
from flowalign.objectives.rwr import flow_rwr_loss, rwr_weights

__all__ = [
    "BTTProbabilities",
    "btt_loss",
    "btt_probabilities",
    "pairwise_accuracy",
    "tie_calibrated_accuracy",
    "check_shared_pair_noise",
    "diffusion_dpo_loss",
    "dpo_inside",
    "flow_dpo_beta",
    "flow_dpo_loss",
    "flow_matching_loss",
    "flow_rwr_loss",
    "per_sample_mse",
    "rwr_weights",
    "split_pairs",
    "time_loss_weight",
    "velocity_error",
    "velocity_errors_for_pairs",
]
