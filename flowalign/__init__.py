"""flowalign: alignment and distillation of rectified-flow models (see README.md and docs/design.md)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package whose names are imported on first use.

    ``exports`` maps each submodule (relative to ``package``) to the names it defines, so importing the
    package itself stays cheap: ``__getattr__, __dir__ = lazy_exports(__name__, {"loop": ("train",)})``.
    """
    module_globals = vars(importlib.import_module(package))
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*module_globals, *where})

    return __getattr__, __dir__
