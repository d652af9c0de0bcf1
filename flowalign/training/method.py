"""The contract between the training loop and an algorithm: :class:`Method` and :class:`StepContext`.

The loop (``flowalign.training.loop``) knows no method math. A method owns its networks and
turns a batch into a loss; the loop owns optimizers, precision, distribution, logging and
checkpoints. A minimal method::

    class FlowMatching(Method):
        def __init__(self, net):
            self.net = net

        def trainable_modules(self):
            return {"net": self.net}

        def compute_loss(self, batch, ctx, group):
            x0 = batch["x0"]                                        # [B, C, H, W]
            ids = batch["index"]                                    # [B] dataset indices
            noise = ctx.randn_like(x0, ids)                         # per-sample, deterministic
            t = ctx.rand((), ids)                                   # [B]
            x_t = flow.interpolate(x0, noise, t)
            v = ctx.module("net")(x_t, t)                           # through the DDP wrapper
            loss = (v.float() - flow.velocity_target(x0, noise)).pow(2).mean()
            return loss, {}

Random numbers drawn through the context depend only on (seed, step, group, key, sample index),
never on the process count, micro-batch split or call order across processes, so a run on 2
processes draws the same noise as one on 1 process with the same global batch, and resuming
needs nothing but the step number.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowalign.config import OptimConfig
from flowalign.files import match_umask

__all__ = ["Method", "StepContext", "sample_seed"]


def sample_seed(seed: int, step: int, group: str, key: str, sample_id: int) -> int:
    """A 63-bit seed derived from (run seed, step, group, draw key, sample id) by BLAKE2b.

    Hash-derived (not ``seed + sample_id``) so that neighbouring ids/steps give unrelated streams.
    """
    msg = f"{seed}/{step}/{group}/{key}/{sample_id}".encode()
    return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def _as_ids(sample_ids: Tensor | Sequence[int]) -> list[int]:
    if isinstance(sample_ids, Tensor):
        if sample_ids.ndim != 1 or sample_ids.dtype.is_floating_point or sample_ids.dtype == torch.bool:
            raise ValueError(
                f"sample_ids must be a 1-D integer tensor (the batch's 'index'), got dtype {sample_ids.dtype} "
                f"shape {tuple(sample_ids.shape)}"
            )
        return [int(i) for i in sample_ids.tolist()]
    ids = list(sample_ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"sample_ids must be integers (the batch's 'index'), got {ids[:8]!r}")
    return ids


class StepContext:
    """What ``Method.compute_loss`` knows about the current (micro-)step, plus per-sample RNG.

    Attributes:
        step: index of the optimizer step being computed (0-based; equals the number of steps done).
        seed: the run seed (``TrainConfig.seed``).
        group: the parameter group being updated by this loss.
        micro_step: gradient-accumulation index within the step, 0..grad_accum_steps-1.
        process_index: rank of this process; num_processes: world size.
        device: where batches live and where the trainable modules are.
        mixed_precision: "no", "bf16" or "fp16" (the forward runs under the matching autocast).
        modules: the trainable modules as prepared by the loop (DDP-wrapped when distributed).
            Call forward through these so that gradients are synchronised across processes.
    """

    def __init__(
        self,
        *,
        step: int,
        seed: int,
        group: str = "main",
        micro_step: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
        device: torch.device | str = "cpu",
        mixed_precision: str = "no",
        modules: Mapping[str, nn.Module] | None = None,
    ) -> None:
        self.step = step
        self.seed = seed
        self.group = group
        self.micro_step = micro_step
        self.process_index = process_index
        self.num_processes = num_processes
        self.device = torch.device(device)
        self.mixed_precision = mixed_precision
        self.modules: Mapping[str, nn.Module] = dict(modules or {})
        self._auto_key = 0

    def module(self, name: str) -> nn.Module:
        """The prepared trainable module ``name`` (call forward on this one, not on your own reference)."""
        if name not in self.modules:
            raise KeyError(f"no trainable module named {name!r}; the method declared {sorted(self.modules)}")
        return self.modules[name]

    def _key(self, key: str | None) -> str:
        if key is not None:
            return key
        self._auto_key += 1
        return f"#{self._auto_key}"

    def generator(self, sample_id: int, *, key: str) -> torch.Generator:
        """A CPU ``torch.Generator`` seeded from (seed, step, group, key, sample_id)."""
        return torch.Generator().manual_seed(sample_seed(self.seed, self.step, self.group, key, sample_id))

    def per_sample(
        self,
        fn: Callable[[torch.Generator], Tensor],
        sample_ids: Tensor | Sequence[int],
        *,
        key: str | None = None,
    ) -> Tensor:
        """Stack ``fn(generator_i)`` over the samples: ``[B, *fn_shape]`` on ``self.device``.

        ``key`` names the draw (e.g. "noise", "t"); without it each call in one ``compute_loss``
        gets the next automatic key, so repeated calls give independent numbers.
        """
        key = self._key(key)
        ids = _as_ids(sample_ids)
        if not ids:
            raise ValueError("sample_ids is empty")
        out = torch.stack([fn(self.generator(i, key=key)) for i in ids])
        return out.to(self.device)

    def randn(
        self,
        shape: int | Sequence[int],
        sample_ids: Tensor | Sequence[int],
        *,
        key: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Standard normal numbers, ``[B, *shape]`` (``shape=()`` gives ``[B]``), one stream per sample."""
        return self._draw(torch.randn, shape, sample_ids, key=key, dtype=dtype)

    def randn_like(self, x: Tensor, sample_ids: Tensor | Sequence[int], *, key: str | None = None) -> Tensor:
        """Standard normal noise shaped like ``x`` ([B, ...]); sample b's noise depends only on its id."""
        ids = _as_ids(sample_ids)
        if x.ndim == 0 or x.shape[0] != len(ids):
            raise ValueError(
                f"x has batch size {x.shape[0] if x.ndim else 0} but {len(ids)} sample_ids were given"
            )
        return self.randn(tuple(x.shape[1:]), ids, key=key, dtype=x.dtype).to(x.device)

    def rand(
        self,
        shape: int | Sequence[int],
        sample_ids: Tensor | Sequence[int],
        *,
        key: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Uniform numbers in [0, 1), ``[B, *shape]`` (``shape=()`` gives ``[B]``, e.g. one t per sample)."""
        return self._draw(torch.rand, shape, sample_ids, key=key, dtype=dtype)

    def _draw(self, sampler, shape, sample_ids, *, key, dtype) -> Tensor:
        """``sampler`` (``torch.randn``/``torch.rand``) drawn in fp32 from each sample's stream, then cast."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return self.per_sample(
            lambda g: sampler(shape, generator=g, dtype=torch.float32), sample_ids, key=key
        ).to(dtype)


class Method(abc.ABC):
    """Base class of training algorithms: networks + objective, no optimizer or logging code.

    Subclasses implement :meth:`trainable_modules` and :meth:`compute_loss`; every other hook has
    a default. The loop only ever calls these hooks, so any object providing them works too.
    """

    @abc.abstractmethod
    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules whose ``requires_grad`` parameters are optimised, checkpointed and EMA'd, by name.

        Names become file names (``model-<name>.safetensors``), so keep them stable across runs.
        """

    @abc.abstractmethod
    def compute_loss(
        self, batch: dict, ctx: StepContext, group: str
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Loss of one micro-batch for parameter group ``group``.

        Args:
            batch: collated micro-batch on ``ctx.device`` (a dict, or a typed batch of
                :mod:`flowalign.data.batches`); its ``index`` is a [B] int64 tensor of dataset
                indices (use it as ``sample_ids`` for random draws).
            ctx: step number, devices, prepared modules and per-sample RNG.
            group: which optimizer group this loss updates (see :meth:`groups_to_update`).

        Returns:
            A scalar loss (the mean over the micro-batch, so accumulation and processes average
            correctly) and scalar metrics to log (averaged over micro-batches and processes).
        """

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Modules the loop only moves to the device (reference nets, VAEs, text encoders). Default none."""
        return {}

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups, one AdamW + LR schedule each. Default: "main" = all trainable params."""
        params = [p for m in self.trainable_modules().values() for p in m.parameters() if p.requires_grad]
        return {"main": params}

    def optim_config(self, group: str, base: OptimConfig) -> OptimConfig:
        """Optimizer settings of ``group`` (e.g. ``dataclasses.replace(base, lr=...)``). Default: ``base``."""
        return base

    def groups_to_update(self, step: int) -> list[str]:
        """Groups updated at ``step``, in order (e.g. a critic on most steps, the generator every k-th)."""
        return list(self.optimizer_groups())

    def ema_modules(self) -> list[str]:
        """Names of trainable modules that get an EMA (when enabled). Default: all of them."""
        return list(self.trainable_modules())

    def collate(self, items: list[dict]) -> dict:
        """Turn dataset items into a batch. Default: ``torch.utils.data.default_collate``."""
        return torch.utils.data.default_collate(items)

    def state_dict(self) -> dict[str, Any]:
        """Extra method state to checkpoint (tensors, numbers, strings, lists/dicts of those). Default none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output. The default accepts only an empty state."""
        if state:
            raise ValueError(
                f"{type(self).__name__} keeps no extra state but the checkpoint has keys {sorted(state)}"
            )

    def export(self, out_dir: Path) -> None:
        """Write the final model loadably. Default: per trainable module, a LoRA adapter
        (``<name>/pytorch_lora_weights.safetensors``) if it has one, else ``save_pretrained``
        (diffusers/transformers models) or the state dict as ``<name>.safetensors``."""
        from flowalign.models.lora import has_lora, save_lora

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, module in self.trainable_modules().items():
            if has_lora(module):
                save_lora(module, out_dir / name)
            elif hasattr(module, "save_pretrained"):
                module.save_pretrained(out_dir / name, safe_serialization=True)
                match_umask(out_dir / name)  # safetensors writes 0600
            else:
                from safetensors.torch import save_file

                state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
                save_file(state, str(out_dir / f"{name}.safetensors"))
                match_umask(out_dir / f"{name}.safetensors")
