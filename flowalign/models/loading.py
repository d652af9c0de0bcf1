"""Loading any supported family: the table of built-in families and the one ``load_flow_model``.

Each family module registers its class with :func:`flowalign.models.base.register_family`; importing
them here (and not from ``base``) keeps the graph one way: families -> base, loading -> families.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flowalign.models.base import _FAMILIES, FlowModel, ModelLoadError, read_model_index
from flowalign.models.flux import FluxModel
from flowalign.models.flux2 import Flux2KleinModel, Flux2Model
from flowalign.models.hunyuan_video15 import HunyuanVideo15Model
from flowalign.models.ltx2 import LTX2Model
from flowalign.models.qwen_image import QwenImageModel
from flowalign.models.qwen_image_edit import QwenImageEditModel, QwenImageEditPlusModel
from flowalign.models.sd3 import SD3Model, without_t5
from flowalign.models.toy import ToyModel
from flowalign.models.wan import WanModel
from flowalign.models.wan_i2v import WanI2VModel
from flowalign.models.z_image import ZImageModel

__all__ = ["BUILTIN_FAMILIES", "family_for", "load_flow_model", "registered_families"]

BUILTIN_FAMILIES = (
    SD3Model,
    FluxModel,
    WanModel,
    WanI2VModel,
    ToyModel,
    Flux2Model,
    Flux2KleinModel,
    ZImageModel,
    QwenImageModel,
    QwenImageEditPlusModel,
    QwenImageEditModel,
    HunyuanVideo15Model,
    LTX2Model,
)
"""The families shipped with the package (importing their modules registered them)."""


def registered_families() -> dict[str, type[FlowModel]]:
    """Pipeline class name (``model_index.json``'s ``_class_name``) -> the FlowModel class that loads it."""
    return dict(_FAMILIES)


def family_for(path_or_id: str | Path) -> type[FlowModel]:
    """The FlowModel class that can load ``path_or_id``."""
    index = read_model_index(path_or_id)
    name = index.get("_class_name")
    families = registered_families()
    if name not in families:
        raise ModelLoadError(
            f"{path_or_id}: pipeline class {name!r} is not a supported family; supported: {sorted(families)}"
        )
    return families[name]


def load_flow_model(
    path_or_id: str | Path,
    *,
    torch_dtype: torch.dtype | dict[str, torch.dtype] = torch.float32,
    device: torch.device | str = "cpu",
    drop_t5: bool = False,
    **components: Any,
) -> FlowModel:
    """Load any supported family from a hub id or a local diffusers folder.

    ``drop_t5`` loads SD3 / SD3.5 without its T5 text encoder (see :func:`flowalign.models.sd3.without_t5`).

    ``torch_dtype`` is the compute dtype of every component (or a per-component dict, see
    :meth:`FlowModel.component_dtypes`); the family's fp32 components (Wan's VAE) stay fp32. Under
    several processes (``accelerate launch``), ``device="cuda"`` means this process's GPU (``LOCAL_RANK``).
    """
    from flowalign.sharding import local_device

    device = local_device(device) if isinstance(device, str) else device
    family = family_for(path_or_id)
    if drop_t5:
        components = without_t5(family, str(path_or_id), components)
    return family.from_pretrained(path_or_id, torch_dtype=torch_dtype, device=device, **components)
