"""Typed config values: :class:`ConfigError`, the coercion of a YAML / override value to the annotated
type of a dataclass field (``"1e-4"`` -> float, ``[0.9, 0.99]`` -> tuple, ``"runs/x"`` -> Path, ``null``
-> None for optional fields, one of a ``Literal``'s choices) and :func:`_build`, which makes a (nested)
dataclass from a mapping, naming the dotted key of each bad value. :mod:`flowalign.config` loads YAML
files and overrides through them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from flowalign.validation import check_number, load_yaml_bounded, short_repr

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration problem: unknown key, wrong type or invalid value.

    ``key`` is the dotted key the problem is about (may be empty for file-level problems).
    """

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.reason = message


def _check(condition: bool, key: str, reason: str) -> None:
    """Raise a ConfigError about ``key`` (relative to the dataclass being validated) if not condition."""
    if not condition:
        raise ConfigError(reason, key=key)


# --------------------------------------------------------------------------------------------
# Type coercion


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _non_none(tp: Any) -> list[Any]:
    return [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass type inside ``tp`` (``X`` or ``X | None``), else None."""
    for arg in _non_none(tp):
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


class _CoerceError(Exception):
    pass


ALLOW_INF = {"allow_inf": True}
"""Field metadata of a float field for which +-inf is a meaningful setting (e.g. an exact limit)."""


def _allow_inf(cls: type) -> frozenset[str]:
    """Names of the fields of dataclass ``cls`` whose metadata allows +-inf."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("allow_inf"))


def _load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` bounded in nesting depth and alias expansion (``load_yaml_bounded``)."""
    try:
        return load_yaml_bounded(text, source)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _coerce(value: Any, tp: Any, key: str, source: str, allow_inf: bool = False) -> Any:
    """Convert ``value`` (from YAML or an override) to the annotated type ``tp``.

    Floats must be finite (NaN never passes; +-inf only where the field's metadata has ``allow_inf``).
    """
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _CoerceError(f"expected {_type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source, allow_inf)
            except _CoerceError as err:
                errors.append(str(err))
        if len(errors) == 1:  # Optional[X]: X's own reason (e.g. "must be finite")
            raise _CoerceError(errors[0])
        raise _CoerceError(f"expected {_type_name(tp)}, got {short_repr(value)}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _CoerceError(f"expected a mapping of {tp.__name__} fields, got {short_repr(value)}")
        return _build(tp, value, key + ".", source)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise _CoerceError(f"expected one of {list(choices)}, got {short_repr(value)}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _CoerceError(f"expected a list ({_type_name(tp)}), got {short_repr(value)}")
        args = typing.get_args(tp)
        if origin is list:
            return [_coerce(v, args[0] if args else Any, key, source, allow_inf) for v in value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key, source, allow_inf) for v in value)
        if args and len(args) != len(value):
            raise _CoerceError(
                f"expected {len(args)} values ({_type_name(tp)}), got {len(value)}: {short_repr(value)}"
            )
        return tuple(
            _coerce(v, a, key, source, allow_inf)
            for v, a in zip(value, args or [Any] * len(value), strict=True)
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise _CoerceError(f"expected a mapping ({_type_name(tp)}), got {short_repr(value)}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {
            _coerce(k, kt, key, source): _coerce(v, vt, f"{key}.{k}", source, allow_inf)
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _CoerceError(f"expected a bool (true/false), got {short_repr(value)}")
    if tp is int:
        if isinstance(value, bool):
            raise _CoerceError(f"expected an int, got {short_repr(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if number.is_integer():
                return int(number)
        raise _CoerceError(f"expected an int, got {short_repr(value)}")
    if tp is float:
        if isinstance(value, bool):
            raise _CoerceError(f"expected a float, got {short_repr(value)}")
        number = None
        if isinstance(value, int | float):
            number = float(value) if not isinstance(value, int) or abs(value) < 2**1023 else math.inf
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise _CoerceError(f"expected a float, got {short_repr(value)}")
        try:
            return float(check_number(number, "the value", allow_inf=allow_inf))
        except ValueError as err:
            raise _CoerceError(str(err)) from None
    if tp is str:
        if isinstance(value, str):
            return value
        raise _CoerceError(f"expected a string, got {short_repr(value)}")
    if tp is Path:
        if isinstance(value, str | os.PathLike):
            return Path(value)
        raise _CoerceError(f"expected a path string, got {short_repr(value)}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _CoerceError(f"expected {_type_name(tp)}, got {short_repr(value)}")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of ``cls`` (nested dataclasses expanded)."""
    keys = []
    for name, tp in _type_hints(cls).items():
        if name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        keys.append(prefix + name)
        sub = _dataclass_in(tp)
        if sub is not None:
            keys.extend(_all_keys(sub, prefix + name + "."))
    return keys


def _unknown_key_error(root: type, full_key: str, source: str, prefix: str = "") -> ConfigError:
    """Error for an unknown key; close matches come from ``root``'s keys (``prefix`` + its dotted keys)."""
    candidates = [k for k in _all_keys(root, prefix) if not full_key.startswith(k + ".")]
    close = difflib.get_close_matches(full_key, candidates, n=3, cutoff=0.6)
    last = full_key.rsplit(".", 1)[-1]
    for cand in candidates:
        if cand.rsplit(".", 1)[-1] == last and cand not in close:
            close.append(cand)
    hint = f"; did you mean {', '.join(repr(c) for c in close[:4])}?" if close else ""
    return ConfigError(f"unknown config key {short_repr(full_key)} in {source}{hint}", key=full_key)


def _build(cls: type[C], data: dict, prefix: str, source: str) -> C:
    """Instantiate dataclass ``cls`` (found at dotted ``prefix``) from a (partial) mapping, coercing each value."""
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        if not isinstance(name, str) or name not in names:
            raise _unknown_key_error(cls, f"{prefix}{name}", source, prefix)
        try:
            kwargs[name] = _coerce(value, hints[name], prefix + name, source, name in _allow_inf(cls))
        except _CoerceError as err:
            raise ConfigError(
                f"invalid value for {prefix + name!r} in {source}: {err}", key=prefix + name
            ) from None
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        keys = ", ".join(repr(prefix + name) for name in missing)
        raise MissingConfigKey(f"missing required config key(s) {keys} in {source}", key=prefix + missing[0])
    try:
        return cls(**kwargs)
    except ConfigError as err:  # from __post_init__: err.key is relative to cls
        full = prefix + err.key
        raise ConfigError(f"invalid value for {full!r} in {source}: {err.reason}", key=full) from None


class MissingConfigKey(ConfigError):
    """A required key (a field without a default) was not given."""


@dataclasses.dataclass(kw_only=True)
class MemorySaverKeys:
    """Memory savers of the frozen modules; ``TrainConfig`` inherits them as ``train.<key>``."""

    vae_slicing: bool = False
    """Run the VAE one sample at a time (diffusers' ``enable_slicing``): same output, the peak of one
    sample instead of a batch (see ``flowalign.models.vae_savers``)."""
    vae_tiling: bool = False
    """Run the VAE on overlapping tiles blended at the seams (diffusers' ``enable_tiling``): the VAE's
    peak stops growing with the resolution; outputs larger than one tile differ slightly at seams."""
    offload_frozen: bool = False
    """Keep the run's frozen modules (a full fine-tune's DPO reference copy, f-distill's teacher, text
    encoders and the VAE while the run uses them) on the CPU and stream their weights to the device
    layer by layer for each forward (accelerate's ``cpu_offload`` hooks): less device memory, slower
    steps (see ``flowalign.training.offload``). Not with FSDP2 or DeepSpeed."""
