"""Model families behind the canonical FlowModel interface (the only code that knows a family)."""

from flowalign.models.base import FlowModel, ModelLoadError, PromptEmbeds, register_family
from flowalign.models.flux import FluxModel
from flowalign.models.loading import family_for, load_flow_model, registered_families
from flowalign.models.sd3 import SD3Model
from flowalign.models.toy import ToyModel
from flowalign.models.wan import WanModel

__all__ = [
    "FlowModel",
    "FluxModel",
    "ModelLoadError",
    "PromptEmbeds",
    "SD3Model",
    "ToyModel",
    "WanModel",
    "family_for",
    "load_flow_model",
    "register_family",
    "registered_families",
]
