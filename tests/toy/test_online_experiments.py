"""The toy online-vs-offline experiments' bookkeeping: the matched budget of iterative DPO's rounds
and the reward-hacking probe's proxy/oracle agreement."""

from __future__ import annotations

import pytest
import torch

from flowalign.experiments.toy_alignment import ToyPairs
from flowalign.experiments.toy_grpo import GRPOBudget
from flowalign.experiments.toy_hacking import proxy_oracle_agreement
from flowalign.experiments.toy_online_dpo import online_config
from flowalign.workflows.candidates import Candidates


def test_rounds_split_the_grpo_budget_exactly():
    budget = GRPOBudget(steps=40, prompts_per_step=8, num_samples=4)
    cfg = online_config(budget, 4)
    assert cfg.regenerate_every == 10 and cfg.num_candidates == 4 and cfg.prompts_per_round == 80
    # 4 rounds x 80 prompts x K = 4 candidates: the 1,280 images GRPO samples in 40 steps of 8 x 4
    assert 4 * cfg.prompts_per_round * cfg.num_candidates == budget.images == 1280
    with pytest.raises(ValueError, match="rounds=3"):
        online_config(budget, 3)


def test_proxy_oracle_agreement_counts_winners_the_oracle_also_prefers():
    scores = {
        "ta": torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 1.0]),
        "vq": torch.tensor([0.5, 0.9, 0.2, 0.2, 0.9, 0.1]),
    }
    cand = Candidates(["p"] * 6, list(range(6)), torch.zeros(6, 3, 2, 2), scores)
    # pair 1: oracle agrees (1.5 > 0.9); pair 2: a tie (0.7 = 0.7) counts half; pair 3: disagrees (0.9 < 1.1)
    pairs = ToyPairs(cand, [(0, 1), (2, 3), (4, 5)])
    assert proxy_oracle_agreement(pairs) == pytest.approx((1 + 0.5 + 0) / 3)
