"""Fixtures of the tokenizer tests: tiny CDT tokenizers with random weights (built in code, no downloads)."""

from __future__ import annotations

import pytest
import torch
from cdt_testing import make_model

from flowalign.tokenizers.cdt import ConditionedDiffusionTokenizer


@pytest.fixture(scope="module")
def model() -> ConditionedDiffusionTokenizer:
    return make_model("small")


@pytest.fixture(scope="module")
def base_layout_model() -> ConditionedDiffusionTokenizer:
    return make_model("base", seed=1)


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny tensors here gain nothing from intra-op threads, and on a busy 2-core machine two
    spinning OpenMP threads make each call 10-30x slower; restore the session's setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
