"""Pins the one-step power study of docs/results.md ("One-step claims at seed-level power").

Reruns ``run_power_grid`` at the recorded settings (``PowerSettings`` defaults: 200 f-distill steps of 32,
DI* 100 steps from the JS student of seed 0) for the arms and training seeds below, and checks

- every arm's seed-level mean within 3 of its recorded seed-level standard errors (the runs are
  seeded, so a rerun differs from the record only through floating-point order on another machine);
- each claim's recorded verdict.

Slow: the teacher's 20-step evaluation and one distillation per cell, ~30 CPU-min on one thread.
"""

from __future__ import annotations

import pytest

from flowalign.experiments.toy_onestep_power import PowerSettings, run_power_grid

pytestmark = pytest.mark.slow

# arm -> metric -> (seed-level mean, seed-level s.e.) measured for docs/results.md
PINNED: dict[str, dict[str, tuple[float, float]]] = {
    "rkl": {
        "tv_joint": (0.2578, 0.0148),
        "entropy": (4.3264, 0.0347),
        "div_jitter": (0.2987, 0.0132),
        "ta": (0.7773, 0.0124),
        "vq": (0.5210, 0.0120),
        "reward": (0.8913, 0.0070),
    },
    "js": {
        "tv_joint": (0.2448, 0.0094),
        "entropy": (4.3432, 0.0350),
        "div_jitter": (0.2941, 0.0101),
        "ta": (0.7913, 0.0124),
        "vq": (0.5059, 0.0215),
        "reward": (0.8951, 0.0054),
    },
    "kl": {
        "tv_joint": (0.2526, 0.0102),
        "entropy": (4.3569, 0.0090),
        "div_jitter": (0.3127, 0.0107),
        "ta": (0.7865, 0.0096),
        "vq": (0.5118, 0.0098),
        "reward": (0.8958, 0.0060),
    },
    "distar-score": {
        "tv_joint": (0.2305, 0.0023),
        "entropy": (4.4076, 0.0135),
        "div_jitter": (0.2633, 0.0061),
        "ta": (0.8232, 0.0117),
        "vq": (0.4128, 0.0083),
        "reward": (0.9188, 0.0011),
    },
    "distar-kl": {
        "tv_joint": (0.2461, 0.0060),
        "entropy": (4.3627, 0.0061),
        "div_jitter": (0.2699, 0.0074),
        "ta": (0.8564, 0.0011),
        "vq": (0.4814, 0.0093),
        "reward": (0.9065, 0.0012),
    },
}
SEEDS = (0, 1, 2)
VERDICTS = {
    "a_js_vs_rkl": "not reproduced",  # TV -0.013 +- 0.006, t -2.3
    "a_fkl_vs_rkl": "not reproduced",  # TV -0.005 +- 0.021, t -0.2
    "b_distar_vs_kl": "not reproduced",  # jitter -0.007 +- 0.005, t -1.2
}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    settings = PowerSettings(seeds=SEEDS, arms=tuple(PINNED))
    return run_power_grid(tmp_path_factory.mktemp("power"), settings, log=lambda _: None)["summary"]


@pytest.mark.parametrize("arm", sorted(PINNED))
def test_arm_means_within_three_seed_level_standard_errors(grid, arm):
    got = grid["arms"][arm]
    assert got["seeds"] == len(SEEDS)
    for metric, (mean, se) in PINNED[arm].items():
        # the floor: an s.e. of 0.000 as printed is < 0.0005, and the mean is printed to 0.001
        assert abs(got[metric]["mean"] - mean) <= 3 * max(se, 0.0005) + 0.0005, (
            metric,
            got[metric],
            mean,
            se,
        )


@pytest.mark.parametrize("claim", sorted(VERDICTS))
def test_claim_verdicts(grid, claim):
    assert grid["claims"][claim]["verdict"].startswith(VERDICTS[claim]), grid["claims"][claim]


def test_a_wider_student_does_not_close_the_vq_gap(tmp_path, grid):
    """JS, seed 0, 2x wider generator: vq 0.527 +- 0.013, ta 0.769 +- 0.013, clean 0.708 (docs/results.md)."""
    from dataclasses import replace

    from flowalign.experiments.toy_onestep import OneStepToySettings, distill_toy, evaluate_one_step
    from flowalign.toy.metrics import sample_mean, standard_error
    from flowalign.training.methods.fdistill import FDistillConfig

    s = replace(OneStepToySettings(), generator_widen=2)
    model, _ = distill_toy(
        None, tmp_path / "wide", FDistillConfig(divergence="js", gan_weight=s.gan_weight), s
    )
    scores = evaluate_one_step(model, s).scores
    for key, (mean, se) in {"ta": (0.769, 0.013), "vq": (0.527, 0.013)}.items():
        assert abs(sample_mean(scores[key]) - mean) <= 3 * se, (key, sample_mean(scores[key]))
    # the finding: no vq gain over the teacher-width JS students beyond their seed-level spread
    narrow = grid["arms"]["js"]["vq"]
    wide_se = standard_error(scores["vq"])
    assert sample_mean(scores["vq"]) - narrow["mean"] < 3 * (narrow["se"] ** 2 + wide_se**2) ** 0.5


# docs/results.md "The critic side": JS, seed 0, one critic setting changed from OneStepToySettings
CRITIC_VARIANTS = {
    "critic_lr_3.3e-4": ({"critic_lr": 3.3e-4}, {"ta": (0.811, 0.013), "vq": (0.510, 0.014)}),
    "critic_lr_3e-3": ({"critic_lr": 3e-3}, {"ta": (0.752, 0.014), "vq": (0.479, 0.014)}),
    "two_critic_updates": (
        {"generator_every": 3, "steps": 300},
        {"ta": (0.782, 0.014), "vq": (0.418, 0.015)},
    ),
}


@pytest.mark.parametrize("variant", sorted(CRITIC_VARIANTS))
def test_no_critic_setting_beats_the_default(tmp_path, variant):
    """Critic lr / 3 or x 3, or two critic updates per generator update, lower vq (default 0.539)."""
    from dataclasses import replace

    from flowalign.experiments.toy_onestep import OneStepToySettings, distill_toy, evaluate_one_step
    from flowalign.toy.metrics import sample_mean, standard_error
    from flowalign.training.methods.fdistill import FDistillConfig

    change, pinned = CRITIC_VARIANTS[variant]
    s = replace(OneStepToySettings(), **change)
    model, _ = distill_toy(
        None, tmp_path / variant, FDistillConfig(divergence="js", gan_weight=s.gan_weight), s
    )
    scores = evaluate_one_step(model, s).scores
    for key, (mean, se) in pinned.items():
        assert abs(sample_mean(scores[key]) - mean) <= 3 * se, (key, sample_mean(scores[key]))
    # the finding: below the recorded seed-0 default (vq 0.539 +- 0.013), by more than its own s.e.
    assert sample_mean(scores["vq"]) < 0.539 - standard_error(scores["vq"])
