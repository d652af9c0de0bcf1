"""Exponential moving average of trainable weights, kept as an fp32 shadow.

    shadow <- decay * shadow + (1 - decay) * param

Only parameters with ``requires_grad`` are tracked (for a LoRA run: the adapters), keyed
``"<module name>.<parameter name>"`` so the state is a flat tensor dict that goes straight into
a safetensors file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from flowalign.training.distributed import shard_like

__all__ = ["EMA"]


def _tracked(modules: Mapping[str, nn.Module]) -> dict[str, nn.Parameter]:
    return {
        f"{name}.{pname}": p
        for name, m in modules.items()
        for pname, p in m.named_parameters()
        if p.requires_grad
    }


class EMA:
    """fp32 EMA of the trainable parameters of named modules.

    Args:
        modules: name -> module; the shadow starts as a copy of their ``requires_grad`` parameters.
        decay: weight of the old shadow in each update, in [0, 1).
        device: where the shadow lives (default: each parameter's device).
    """

    def __init__(
        self, modules: Mapping[str, nn.Module], *, decay: float, device: torch.device | None = None
    ) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        params = _tracked(modules)
        if not params:
            raise ValueError(f"EMA: the modules {sorted(modules)} have no trainable parameters")
        self.shadow: dict[str, Tensor] = {
            k: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
            for k, p in params.items()
        }

    def _params(self, modules: Mapping[str, nn.Module]) -> list[nn.Parameter]:
        params = _tracked(modules)
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())[:5]
            extra = sorted(params.keys() - self.shadow.keys())[:5]
            raise ValueError(f"EMA: parameter names changed since creation (missing {missing}, new {extra})")
        return [params[k] for k in self.shadow]

    @torch.no_grad()
    def update(self, modules: Mapping[str, nn.Module], *, decay: float | None = None) -> None:
        """shadow <- d * shadow + (1 - d) * param, with d = ``decay`` or the configured decay."""
        d = self.decay if decay is None else decay
        shadows = list(self.shadow.values())
        params = [
            p.detach().to(device=s.device, dtype=torch.float32)
            for p, s in zip(self._params(modules), shadows, strict=True)
        ]
        torch._foreach_lerp_(shadows, params, 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, modules: Mapping[str, nn.Module]) -> None:
        """Overwrite the modules' trainable parameters with the shadow (cast to their dtype)."""
        for p, s in zip(self._params(modules), self.shadow.values(), strict=True):
            p.copy_(s.to(device=p.device, dtype=p.dtype))

    @contextlib.contextmanager
    def swapped_in(self, modules: Mapping[str, nn.Module]) -> Iterator[None]:
        """Temporarily load the EMA weights into ``modules`` (e.g. for evaluation or export)."""
        params = self._params(modules)
        backup = [p.detach().clone() for p in params]
        self.copy_to(modules)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        """The shadow tensors (flat dict, safetensors-ready)."""
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore the shadow; names and shapes must match exactly."""
        if state.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state.keys())[:5]
            extra = sorted(state.keys() - self.shadow.keys())[:5]
            raise ValueError(f"EMA state does not match the model (missing {missing}, unexpected {extra})")
        for k, v in state.items():
            if v.shape != self.shadow[k].shape:
                raise ValueError(
                    f"EMA state {k!r} has shape {tuple(v.shape)}, expected {tuple(self.shadow[k].shape)}"
                )
            # a sharded (DTensor) shadow takes this process's shard of the full value
            self.shadow[k] = shard_like(v.to(torch.float32), self.shadow[k]).clone()
