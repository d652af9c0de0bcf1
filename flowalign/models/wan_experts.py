"""Wan 2.2 A14B's two experts as one velocity network, switched at the boundary timestep.

The A14B checkpoints (text-to-video and image-to-video) hold two transformers of one architecture:
``transformer`` denoises the high-noise part of the trajectory and ``transformer_2`` the low-noise
part. Diffusers' Wan pipelines pick per step

    expert = transformer    if timestep >= boundary_ratio * num_train_timesteps
             transformer_2  otherwise,

with timestep = 1000 t. :class:`TwoExpertTransformer` applies the same rule per sample, so a
training batch whose samples have different t runs each sample through its own expert (one
forward per expert present in the batch), and a sampler's step (one t for the batch) through
exactly the expert diffusers uses.

Training can target either expert or both (``train_expert``): only the trained experts are
submodules of the wrapper (LoRA attaches to them, the optimizer sees their parameters); a frozen
expert is held outside the module tree and is never copied (a frozen reference copy of the
wrapper shares it).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import Tensor, nn

TrainExpert = Literal["high", "low", "both"]
EXPERTS = ("high", "low")
LORA_WEIGHT_NAMES = {"high": "pytorch_lora_weights.safetensors", "low": "pytorch_lora_weights_2.safetensors"}
"""File names of each expert's exported LoRA: diffusers loads the first with ``load_lora_weights(dir)``
and the second with ``load_lora_weights(dir, weight_name=..., load_into_transformer_2=True)``."""


class _Held:
    """A frozen expert kept out of the module tree (not a parameter owner, not deep-copied)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo: dict) -> _Held:
        return self


class TwoExpertTransformer(nn.Module):
    """``forward`` takes WanTransformer3DModel's arguments and routes each sample to its expert.

    Args:
        high: the high-noise expert (the pipeline's ``transformer``).
        low: the low-noise expert (``transformer_2``).
        boundary_timestep: ``boundary_ratio * num_train_timesteps`` of the pipeline.
        train_expert: which experts are trainable submodules: "high", "low" or "both".
    """

    def __init__(self, high: nn.Module, low: nn.Module, boundary_timestep: float, train_expert: TrainExpert):
        super().__init__()
        if train_expert not in ("high", "low", "both"):
            raise ValueError(f"train_expert must be 'high', 'low' or 'both', got {train_expert!r}")
        self.boundary_timestep = float(boundary_timestep)
        self.train_expert = train_expert
        self.trained = nn.ModuleDict()
        self._held: dict[str, _Held] = {}
        for name, module in (("high", high), ("low", low)):
            if train_expert in (name, "both"):
                self.trained[name] = module
            else:
                self._held[name] = _Held(module)

    def expert(self, name: str) -> nn.Module:
        """The expert ``"high"`` or ``"low"``, trained or held."""
        return self.trained[name] if name in self.trained else self._held[name].module

    @property
    def config(self) -> Any:
        """The experts' shared architecture config (diffusers' ``config``)."""
        return self.expert("high").config

    @property
    def device(self) -> torch.device:
        return next(self.expert("high").parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.expert("high").dtype

    def is_high(self, timestep: Tensor) -> Tensor:
        """Per sample: does the high-noise expert take it? ``timestep`` is ``[B]`` or per token ``[B, L]``."""
        per_sample = timestep.reshape(timestep.shape[0], -1).amax(dim=1) if timestep.ndim > 1 else timestep
        return per_sample >= self.boundary_timestep

    def add_adapter(self, config: Any, adapter_name: str = "default") -> None:
        """Attach a LoRA adapter (diffusers' ``add_adapter``) to each trained expert."""
        for module in self.trained.values():
            module.add_adapter(copy.deepcopy(config), adapter_name=adapter_name)

    def set_attention_backend(self, backend: str) -> None:
        """diffusers' attention-backend switch, on both experts (trained and held)."""
        for name in EXPERTS:
            self.expert(name).set_attention_backend(backend)

    _hf_peft_config_loaded = False  # lets flowalign.models.lora.add_lora call add_adapter above

    def lora_parts(self) -> dict[str, nn.Module]:
        """LoRA file name -> the trained expert it holds (for :func:`flowalign.models.lora.save_lora`)."""
        return {LORA_WEIGHT_NAMES[name]: module for name, module in self.trained.items()}

    def forward(self, hidden_states: Tensor, timestep: Tensor, **kwargs: Any) -> tuple[Tensor]:
        kwargs.pop("return_dict", None)
        high = self.is_high(timestep)
        if bool(high.all()) or bool((~high).all()):
            net = self.expert("high" if bool(high.all()) else "low")
            return (net(hidden_states=hidden_states, timestep=timestep, return_dict=False, **kwargs)[0],)
        out: Tensor | None = None
        for name, rows in (("high", high), ("low", ~high)):
            idx = rows.nonzero().squeeze(1)
            sub = {k: v.index_select(0, idx) if _batched(v, len(high)) else v for k, v in kwargs.items()}
            part = self.expert(name)(
                hidden_states=hidden_states.index_select(0, idx),
                timestep=timestep.index_select(0, idx),
                return_dict=False,
                **sub,
            )[0]
            if out is None:
                out = part.new_zeros((len(high), *part.shape[1:]))
            out = out.index_copy(0, idx, part)
        return (out,)


def _batched(value: Any, batch: int) -> bool:
    return isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch
