"""Reward registry: name -> loader, so the CLI and configs can say ``--reward pickscore``.

Built-in rewards are listed by name and imported only when loaded (open_clip and transformers
stay unimported until needed). Users add their own with the decorator:

    @register_reward("my_reward")
    def load_my_reward(*, device="cpu", dtype=torch.float32, **kwargs) -> RewardModel: ...

    reward = load_reward("my_reward", device="cuda", dtype=torch.bfloat16)
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from flowalign.rewards.base import RewardModel
from flowalign.validation import check_number, short_repr

__all__ = ["available_rewards", "load_reward", "parse_reward_spec", "register_reward"]

RewardLoader = Callable[..., RewardModel]

# name -> "module:function[:key=value]" resolved on first use.
_BUILTIN: dict[str, str] = {
    "clip": "flowalign.rewards.clip:load_clip",
    "pickscore": "flowalign.rewards.clip:load_pickscore",
    "hpsv2": "flowalign.rewards.clip:load_hpsv2:version=v2.0",
    "hpsv2.1": "flowalign.rewards.clip:load_hpsv2:version=v2.1",
    "aesthetic": "flowalign.rewards.aesthetic:load_aesthetic",
    "imagereward": "flowalign.rewards.imagereward:load_imagereward",
    "multihead": "flowalign.rewards.multihead:load_multihead",
    "ocr": "flowalign.rewards.ocr:load_ocr",
    "remote": "flowalign.rewards.remote:load_remote",
    "toy": "flowalign.rewards.toy:load_toy",
    "toy_classifier": "flowalign.rewards.toy_classifier:load_toy_classifier",
    "videoreward": "flowalign.rewards.videoreward:load_videoreward",
    "vlm_judge": "flowalign.rewards.vlm_judge:load_vlm_judge",
}
_REGISTRY: dict[str, RewardLoader] = {}


def register_reward(name: str) -> Callable[[RewardLoader], RewardLoader]:
    """Register a loader ``(*, device, dtype, **kwargs) -> RewardModel`` under ``name``.

    Raises:
        ValueError: the name is empty or already taken.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"register_reward: name must be a non-empty str, got {name!r}")

    def decorator(loader: RewardLoader) -> RewardLoader:
        if name in _REGISTRY or name in _BUILTIN:
            raise ValueError(f"register_reward: a reward named {name!r} is already registered")
        _REGISTRY[name] = loader
        return loader

    return decorator


def available_rewards() -> list[str]:
    """Names accepted by :func:`load_reward`, sorted."""
    return sorted({*_BUILTIN, *_REGISTRY})


def _resolve(name: str) -> RewardLoader:
    if name in _REGISTRY:
        return _REGISTRY[name]
    module_name, func_name, *fixed = _BUILTIN[name].split(":")
    loader = getattr(importlib.import_module(module_name), func_name)
    fixed_kwargs = dict(item.split("=", 1) for item in fixed)
    return partial(loader, **fixed_kwargs) if fixed_kwargs else loader


def load_reward(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> RewardModel:
    """Build the reward registered as ``name``, frozen and in eval mode.

    Args:
        name: one of :func:`available_rewards`.
        device, dtype: where and in what precision the reward's networks run.
        **kwargs: the loader's own options (model folder/hub id, checkpoint, batch_size, ...).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in _REGISTRY and name not in _BUILTIN:
        raise ValueError(f"unknown reward {name!r}; available rewards: {', '.join(available_rewards())}")
    from flowalign.sharding import local_device

    device = local_device(device) if isinstance(device, str) else device  # "cuda": this process's GPU
    loader = _resolve(name)
    _check_options(name, loader, kwargs)
    reward = loader(device=device, dtype=dtype, **kwargs)
    if not isinstance(reward, RewardModel):
        raise TypeError(f"reward loader {name!r} returned {type(reward).__name__}, expected a RewardModel")
    return reward.eval()


def _check_options(name: str, loader: RewardLoader, kwargs: dict[str, Any]) -> None:
    """Refuse options the loader does not take and required ones not given (ValueError naming them)."""
    try:
        params = inspect.signature(loader).parameters
    except (TypeError, ValueError):  # a loader without a readable signature takes what it takes
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    own = [k for k, p in params.items() if k not in ("device", "dtype") and p.kind is not p.VAR_POSITIONAL]
    unknown = sorted(set(kwargs) - set(own))
    if unknown:
        takes = ", ".join(own) or "none"
        raise ValueError(f"reward {name!r}: unknown option {unknown[0]!r} (its options: {takes})")
    missing = [k for k in own if params[k].default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ValueError(f"reward {name!r} needs the option {missing[0]!r}: give {name}:{missing[0]}=VALUE")


def parse_reward_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a command-line reward spec into a name and loader options.

    ``"pickscore"`` -> ``("pickscore", {})``;
    ``"clip:model=/ckpt/clip,scale=2.5"`` -> ``("clip", {"model": "/ckpt/clip", "scale": 2.5})``.
    Values are read as JSON when they parse (numbers, true/false, null), else kept as strings.

    Raises:
        ValueError: an empty name, an option without ``=``, an option given twice, or a number that is
            NaN or infinite (quoting it).
    """
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"reward spec {spec!r}: empty reward name")
    options: dict[str, Any] = {}
    for token in filter(None, (t.strip() for t in rest.split(","))) if rest else ():
        key, sep, value = token.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"reward spec {spec!r}: option {token!r} is not of the form key=value")
        if key in options:
            raise ValueError(f"reward spec {spec!r}: option {key!r} is given twice")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value.strip()
        if isinstance(options[key], float):  # JSON reads NaN and Infinity too
            check_number(options[key], f"reward spec {short_repr(spec)}: option {key!r}")
    return name, options
