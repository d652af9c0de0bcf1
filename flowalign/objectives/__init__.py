"""Pure objectives: tensors in, per-sample loss and detached metrics out (no modules, configs or I/O).

One module per method (docs/algorithms.md section in brackets):
    flow_matching   per-sample errors, SD3 time weightings, weighted flow matching   [5.2]
    dpo             Flow-DPO and Diffusion-DPO, pair-batch helpers                   [1B, 5.1]
    rwr             Flow-RWR reward weights and loss                                 [1C]
    bt_ties         Bradley-Terry with ties for reward models, accuracies            [1A]
    f_divergences   f, f'' and h(r) = r^2 f''(r) of the f-distill suite              [2.1]
    fdistill        f-distill weights, generator surrogate, fake-score loss          [2.3-2.5]
    gan             discriminator / generator GAN losses, R1                         [2.2]
    distar          Diff-Instruct*: pseudo-Huber score-divergence regulariser + reward  [3]
"""

from flowalign.objectives.bt_ties import (
    BTTProbabilities,
    btt_loss,
    btt_probabilities,
    pairwise_accuracy,
    tie_calibrated_accuracy,
)
from flowalign.objectives.distar import (
    distance_grad,
    distar_generator_loss,
    distar_regularizer,
    guided_reference,
    kl_reward_generator_loss,
    online_score_loss,
    pseudo_huber,
    pseudo_huber_grad,
    score_divergence_surrogate,
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
from flowalign.objectives.f_divergences import (
    FDivergence,
    divergence_names,
    f_second_derivative,
    f_weight,
    get_divergence,
)
from flowalign.objectives.fdistill import (
    RatioBinEMA,
    density_ratio_from_logits,
    f_distill_weights,
    fake_score_loss,
    fdistill_generator_loss,
    normalize_weights,
    time_bin_index,
)
from flowalign.objectives.flow_matching import (
    flow_matching_loss,
    per_sample_mse,
    time_loss_weight,
    velocity_error,
)
from flowalign.objectives.gan import (
    approx_r1_penalty,
    gan_discriminator_loss,
    gan_generator_loss,
    r1_penalty,
)
from flowalign.objectives.rwr import flow_rwr_loss, rwr_weights

__all__ = [
    "BTTProbabilities",
    "FDivergence",
    "RatioBinEMA",
    "approx_r1_penalty",
    "btt_loss",
    "btt_probabilities",
    "check_shared_pair_noise",
    "density_ratio_from_logits",
    "diffusion_dpo_loss",
    "distance_grad",
    "distar_generator_loss",
    "distar_regularizer",
    "divergence_names",
    "dpo_inside",
    "f_distill_weights",
    "f_second_derivative",
    "f_weight",
    "fake_score_loss",
    "fdistill_generator_loss",
    "flow_dpo_beta",
    "flow_dpo_loss",
    "flow_matching_loss",
    "flow_rwr_loss",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "get_divergence",
    "guided_reference",
    "kl_reward_generator_loss",
    "normalize_weights",
    "online_score_loss",
    "pairwise_accuracy",
    "per_sample_mse",
    "pseudo_huber",
    "pseudo_huber_grad",
    "r1_penalty",
    "rwr_weights",
    "score_divergence_surrogate",
    "split_pairs",
    "tie_calibrated_accuracy",
    "time_bin_index",
    "time_loss_weight",
    "velocity_error",
    "velocity_errors_for_pairs",
]
