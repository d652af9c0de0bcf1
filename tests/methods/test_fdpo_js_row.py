"""The f-DPO (JS) row of the toy online/offline comparison: its code path at a tiny budget (fast) and
the measured row at the offline Flow-DPO row's budget (slow)."""

from __future__ import annotations

import math

import pytest
import torch

from flowalign.experiments.toy_base import toy_base_model
from flowalign.experiments.toy_extra_rows import base_guidance_rows, best_guidance, fdpo_row, nrg_row
from flowalign.experiments.toy_grpo import GRPOBudget, _evaluate

# docs/results.md (online preference optimisation): 319 pairs, 40 steps of 16 pairs, LoRA r16, lr 1e-3,
# beta 5000, divergence js; 256 held-out samples; paired mean difference to the base ± s.e.
MEASURED = {"ta": (0.014, 0.007), "vq": (0.045, 0.007)}  # Δta +0.014 ± 0.007, Δvq +0.045 ± 0.007


def test_fdpo_row_tiny_budget_is_paired_to_the_base(tmp_path):
    torch.set_num_threads(1)
    base = toy_base_model("image")
    budget = GRPOBudget(steps=2, prompts_per_step=2, num_samples=2, eval_samples=8, num_inference_steps=4)
    row = fdpo_row(base, tmp_path, budget, divergence="js", progress=False)
    assert set(row) == {"ta", "vq", "all_correct"}
    assert (tmp_path / "fdpo_js" / "final").is_dir()
    base_scores = _evaluate(base, budget)
    for dim, r in row.items():
        # the paired mean difference is the difference of the means (8 samples, fp64)
        assert math.isclose(r["diff"], r["mean"] - float(base_scores[dim].double().mean()), abs_tol=1e-12)
        assert r["se"] >= 0.0


def test_best_guidance_rule():
    def row(ta, vq):
        return {"ta": {"mean": ta}, "vq": {"mean": vq}}

    rows = {1.5: row(0.7, 0.8), 3.0: row(0.8, 0.75), 5.0: row(0.85, 0.7)}
    assert best_guidance(rows, 3.0) == 3.0  # 3.0 and 5.0 tie at 1.55: the nearer to 3.0
    rows[4.0] = row(0.9, 0.7)
    assert best_guidance(rows, 3.0) == 4.0
    with pytest.raises(ValueError, match="best_guidance"):
        best_guidance({}, 3.0)


@pytest.mark.slow
def test_fdpo_js_row_matches_the_measured_run(tmp_path):
    torch.set_num_threads(2)
    base = toy_base_model("image")
    row = fdpo_row(base, tmp_path, GRPOBudget(), divergence="js", progress=False)
    for dim, (mean, se) in MEASURED.items():
        assert abs(row[dim]["diff"] - mean) < 3 * max(se, row[dim]["se"]), (dim, row[dim], mean)


def test_base_guidance_rows_pair_against_the_reference_scale():
    torch.set_num_threads(1)
    budget = GRPOBudget(eval_samples=4, num_inference_steps=2)
    rows = base_guidance_rows(toy_base_model("image"), budget, [budget.guidance_scale, 1.0])
    for r in rows[budget.guidance_scale].values():  # the same scale, prompts and seeds: identical samples
        assert r["diff"] == 0.0 and r["se"] == 0.0
    assert any(r["diff"] != 0.0 for r in rows[1.0].values())


def test_nrg_row_tiny_budget_is_paired_to_the_base(tmp_path):
    torch.set_num_threads(1)
    base = toy_base_model("image")
    budget = GRPOBudget(eval_samples=4, num_inference_steps=2)
    row = nrg_row(
        base, tmp_path, budget, num_train_prompts=2, samples_per_prompt=2, train_steps=2,
        counterfactual_pairs=4, batch_size=4,
    )  # fmt: skip
    base_scores = _evaluate(base, budget)
    for dim, r in row.items():
        assert math.isclose(r["diff"], r["mean"] - float(base_scores[dim].double().mean()), abs_tol=1e-12)
    assert (tmp_path / "nrg_rm" / "final").is_dir()
