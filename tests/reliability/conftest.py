"""Setup of the reliability suite: one thread, helper imports, hypothesis profiles, the summary.

Hypothesis profiles: ``flowalign-ci`` (few, derandomised examples; what the fast tests use) and
``flowalign-slow`` (many random examples; the ``slow`` fuzz tests). Set ``FLOWALIGN_RELIABILITY_SUMMARY``
to a file name to get the summary of what ran (methods resumed exactly, kill trials survived, fuzz
cases per input kind, loading paths checked) printed and written there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

HERE = Path(__file__).resolve().parent
for folder in (HERE, HERE.parent / "training"):  # rel_* helpers; training_toy (the loop's toy method)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_COMMON = {
    "deadline": None,
    "database": None,  # nothing written into the checkout
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
}
settings.register_profile("flowalign-ci", max_examples=30, derandomize=True, **_COMMON)
settings.register_profile("flowalign-slow", max_examples=300, **_COMMON)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test in this folder runs on one thread (the shared ``one_thread`` fixture)."""


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    import rel_summary

    target = os.environ.get("FLOWALIGN_RELIABILITY_SUMMARY")
    if not target or rel_summary.is_empty():
        return
    text = rel_summary.render()
    Path(target).write_text(text + "\n", encoding="utf-8")
    terminalreporter.write_sep("=", "flowalign reliability summary")
    terminalreporter.write_line(text)
    terminalreporter.write_line(f"(written to {target})")
