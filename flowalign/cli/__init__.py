"""The ``flowalign`` command line: each command parses arguments and calls one library function.

One module per command group: :mod:`.generate`, :mod:`.train`, :mod:`.tokenize`, :mod:`.data` (pairs,
rechoose, score), :mod:`.eval`, :mod:`.demo`, :mod:`.lora` (lora-comfyui), :mod:`.plan`,
:mod:`.push` and :mod:`.serve` (serve-reward); :mod:`.app` holds the
Typer application and the shared helpers. Importing a module registers its commands (in this order,
which is the order of ``flowalign --help``).
"""

from __future__ import annotations

import os

# Importing a module registers its commands; this order is the order of ``flowalign --help``.
# isort: off
from flowalign.cli import generate, train, tokenize, data, eval, demo, lora, plan, push, serve  # noqa: F401

# isort: on
from flowalign.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``flowalign`` script and ``python -m flowalign``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
