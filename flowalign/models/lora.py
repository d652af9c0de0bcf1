"""LoRA on diffusers (or any torch) models through peft: attach, disable-as-reference, export, merge.

With LoRA the frozen reference of DPO-style methods is the same network with its adapters
switched off (:func:`adapters_disabled`), not a second copy in memory. Exports use the diffusers
LoRA file format: ``pytorch_lora_weights.safetensors`` with keys ``"<prefix>.<module path>.lora_A.weight"``
and the adapter config under the ``lora_adapter_metadata`` header, which a pipeline's
``load_lora_weights(dir)`` or a model's ``load_lora_adapter(dir, prefix=...)`` reads back.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import peft
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from torch import Tensor, nn

from flowalign.config import LoraConfig
from flowalign.files import save_safetensors

__all__ = [
    "LORA_WEIGHT_NAME",
    "adapters_disabled",
    "add_lora",
    "has_lora",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "save_lora",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP/compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def _tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in _unwrap(model).modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries peft adapter layers."""
    return bool(_tuner_layers(model))


def add_lora(model: nn.Module, cfg: LoraConfig, *, adapter_name: str = "default") -> list[nn.Parameter]:
    """Freeze ``model`` and attach trainable LoRA adapters to the layers named in ``cfg.target_modules``.

    Uses ``model.add_adapter`` for diffusers models (so ``save_lora_adapter``/``fuse_lora`` work
    too) and ``peft.inject_adapter_in_model`` for other modules.

    Returns:
        The LoRA parameters (the only ones with ``requires_grad`` afterwards).

    Raises:
        ValueError: no layer of ``model`` matches ``cfg.target_modules``.
    """
    peft_cfg = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=list(cfg.target_modules),
        lora_dropout=cfg.dropout,
        init_lora_weights=True if cfg.init == "default" else "gaussian",
    )
    model.requires_grad_(False)
    try:
        if hasattr(model, "add_adapter") and hasattr(model, "_hf_peft_config_loaded"):
            model.add_adapter(peft_cfg, adapter_name=adapter_name)
        else:
            peft.inject_adapter_in_model(peft_cfg, model, adapter_name=adapter_name)
            if not hasattr(model, "peft_config"):
                model.peft_config = {}
            model.peft_config[adapter_name] = peft_cfg
    except ValueError as err:
        raise ValueError(
            f"cannot attach LoRA to {type(model).__name__} with target_modules={list(cfg.target_modules)}: {err}"
        ) from None
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that belong to LoRA branches (names containing ``lora_``)."""
    return [p for n, p in _unwrap(model).named_parameters() if "lora_" in n]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base (adapters off) inside the block; restores each layer's previous state.

    The output then equals the base model's exactly (the adapter branch is skipped, not zeroed), which is
    how LoRA methods compute the frozen reference from the same weights.
    """
    layers = _tuner_layers(model)
    if not layers:
        raise ValueError(f"{type(_unwrap(model)).__name__} has no LoRA adapters to disable")
    previous = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, was_disabled in zip(layers, previous, strict=True):
            layer.enable_adapters(not was_disabled)


def lora_state_dict(model: nn.Module, *, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter weights in peft/diffusers naming (``<path>.lora_A.weight``), detached on CPU."""
    state = get_peft_model_state_dict(_unwrap(model), adapter_name=adapter_name)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def save_lora(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    prefix: str | None = "transformer",
    adapter_name: str = "default",
    weight_name: str = LORA_WEIGHT_NAME,
) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` in diffusers' LoRA format (atomically).

    A network whose ``lora_parts()`` maps file names to components (Wan 2.2 A14B's trained experts)
    writes one file per component into ``out_dir``.

    Args:
        model: the adapted model.
        out_dir: destination folder (created).
        prefix: the pipeline component the LoRA belongs to ("transformer" for SD3/FLUX/Wan,
            "unet" for UNet pipelines); None writes bare keys (for ``load_lora_adapter(prefix=None)``).
        adapter_name: which adapter to export.
        weight_name: the file name inside ``out_dir``.

    Returns:
        The written file.
    """
    inner = _unwrap(model)
    parts = getattr(inner, "lora_parts", None)
    if callable(parts):  # a network of several pipeline components (Wan 2.2 A14B's experts): one file each
        written = [
            save_lora(part, out_dir, prefix=prefix, adapter_name=adapter_name, weight_name=name)
            for name, part in parts().items()
        ]
        if not written:
            raise ValueError(f"{type(inner).__name__} has no trained part with a LoRA adapter")
        return written[0]
    configs = getattr(inner, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(
            f"{type(inner).__name__} has no LoRA adapter named {adapter_name!r} (has {sorted(configs)})"
        )
    meta = configs[adapter_name].to_dict()
    meta = {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}
    state = lora_state_dict(inner, adapter_name=adapter_name)
    if prefix:
        state = {f"{prefix}.{k}": v for k, v in state.items()}
        meta = {f"{prefix}.{k}": v for k, v in meta.items()}
    header = {"format": "pt", _METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True, default=str)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return save_safetensors(state, out_dir / weight_name, metadata=header)  # same bytes run to run


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights (W <- W + scale * B A) and remove the LoRA layers.

    Returns the same (unwrapped) model, now a plain model whose output equals the adapted one's.
    """
    inner = _unwrap(model)
    layers = [(n, m) for n, m in inner.named_modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError(f"{type(inner).__name__} has no LoRA adapters to merge")
    for name, layer in layers:
        if layer.disable_adapters:
            raise ValueError(f"cannot merge: the adapters of layer {name!r} are disabled")
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = inner.get_submodule(parent_name) if parent_name else inner
        setattr(parent, child, layer.get_base_layer())
    for module in inner.modules():  # the model and any adapted component inside it
        if hasattr(module, "peft_config"):
            delattr(module, "peft_config")
        if hasattr(module, "_hf_peft_config_loaded"):
            module._hf_peft_config_loaded = False
    return inner
