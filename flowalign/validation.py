"""Checks for numbers from any source (command line, YAML, ``--set`` overrides, reward specs).

:func:`check_number` is the one rule: a number is finite unless the caller allows infinity (NaN is never
accepted: every comparison with it is false, so ``nan < 1`` slips past a plain range check), and it lies in
the stated range. Failures raise ``ValueError`` naming the key. :func:`short_repr` keeps the offending
value in a message short, whatever its size.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

__all__ = ["MAX_SHOWN", "MAX_YAML_VALUES", "check_number", "load_yaml_bounded", "short_repr"]

MAX_SHOWN = 80  # characters of a value shown in an error message
MAX_YAML_VALUES = 100_000  # values in a loaded YAML tree with aliases expanded (the recipes hold < 500)


def short_repr(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters (with the full length noted) for error messages.

    Containers are summarised before ``repr`` is taken, so a huge (or alias-expanded) list costs O(limit).
    """
    if isinstance(value, list | tuple | dict | set) and len(value) > limit:
        kind = type(value).__name__
        return f"<{kind} of {len(value)} items>"
    try:
        text = repr(value)
    except RecursionError:
        return f"<{type(value).__name__} nested too deeply to show>"
    if len(text) <= limit:
        return text
    return f"{text[: limit - 3]}... ({len(text)} characters)"


def check_number(
    value: Any,
    name: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    allow_inf: bool = False,
    integer: bool = False,
) -> float | int:
    """Return ``value`` if it is a real number within the bounds, else raise ValueError naming ``name``.

    Args:
        value: the number (bool is refused; an int stays an int).
        name: the key, option or field, quoted in the message.
        lo, hi: inclusive bounds (exclusive with ``lo_open`` / ``hi_open``); None for no bound.
        allow_inf: accept +-inf (still subject to the bounds); NaN is always refused.
        integer: require an integral value.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {short_repr(value)}")
    if isinstance(value, float):
        if math.isnan(value):
            raise ValueError(f"{name} must be a number, got nan")
        if math.isinf(value) and not allow_inf:
            raise ValueError(f"{name} must be finite, got {value}")
        if integer and not value.is_integer():
            raise ValueError(f"{name} must be a whole number, got {value}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {short_repr(value)}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {short_repr(value)}")
    return value


def _check_expanded_size(data: Any, source: str, limit: int) -> None:
    """Refuse a loaded tree that, with shared (aliased) nodes counted each time, holds over ``limit`` values.

    PyYAML shares an aliased node instead of copying it, so a few hundred bytes of nested aliases load
    cheaply but expand exponentially when walked (coercion, printing). This walk stops at the budget.
    """
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > limit:
            raise ValueError(
                f"{source}: more than {limit} values once YAML aliases are expanded; refused "
                "(nested aliases multiply a small file into a huge one)"
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)


def load_yaml_bounded(text: str, source: str, *, limit: int = MAX_YAML_VALUES) -> Any:
    """``yaml.safe_load(text)``, refusing (ValueError naming ``source``) invalid YAML, nesting too deep for
    the parser, and trees over ``limit`` values with aliases expanded."""
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{source} is not valid YAML: {short_repr(str(err), 400)}") from None
    except RecursionError:
        raise ValueError(f"{source}: YAML nested too deeply") from None
    _check_expanded_size(loaded, source, limit)
    return loaded
