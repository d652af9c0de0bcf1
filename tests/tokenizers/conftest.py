"""Fixtures of the tokenizer tests: tiny CDT tokenizers with random weights (built in code, no downloads)."""

from __future__ import annotations

import pytest
from cdt_testing import make_model

from flowalign.tokenizers.cdt import ConditionedDiffusionTokenizer


@pytest.fixture(scope="module")
def model() -> ConditionedDiffusionTokenizer:
    return make_model("small")


@pytest.fixture(scope="module")
def base_layout_model() -> ConditionedDiffusionTokenizer:
    return make_model("base", seed=1)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test in this folder runs on one thread (the shared ``one_thread`` fixture)."""
