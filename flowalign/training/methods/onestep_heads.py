"""The f-distill discriminator's parts: the teacher's block features and the heads on them
(docs/algorithms.md 2.2).

:class:`TeacherFeatures` reads token features of the frozen teacher at chosen blocks with forward
hooks; :class:`DiscriminatorHeads` maps them to one logit per block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flowalign.models.base import FlowModel, PromptEmbeds

__all__ = ["DiscriminatorHeads", "TeacherFeatures", "find_blocks"]


def find_blocks(transformer: nn.Module) -> nn.ModuleList:
    """The main list of transformer blocks (``transformer_blocks`` in SD3/FLUX, ``blocks`` in Wan,
    ``layers`` in Z-Image).

    Raises:
        ValueError: the module has neither attribute (an unsupported teacher architecture).
    """
    for name in ("transformer_blocks", "blocks", "layers"):
        blocks = getattr(transformer, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    raise ValueError(
        f"{type(transformer).__name__} has no 'transformer_blocks' or 'blocks' list (nor a 'layers' list): "
        "the discriminator needs a transformer teacher (SD3, FLUX, FLUX.2, Qwen-Image, Wan, Z-Image or toy families)"
    )


class _StopForward(Exception):
    """Raised by the last feature hook: the rest of the teacher's forward is not needed."""


class TeacherFeatures:
    """Token features of the frozen teacher at chosen blocks, read by forward hooks (docs/algorithms.md 2.2).

    The forward stops after the deepest chosen block. A block's output is its hidden states
    ``[B, N, D]`` (the last element when it returns a tuple: SD3 and FLUX blocks return
    ``(context, hidden_states)``, Wan blocks the hidden states alone; a family whose blocks return
    the media first, HunyuanVideo 1.5 and LTX-2, sets ``block_media_index = 0``).

    Args:
        model: the teacher adapter (its ``velocity`` runs the forward).
        blocks: block indices (negative counts from the end); None = the middle block.

    Raises:
        ValueError: an index outside the transformer's block list.
    """

    def __init__(self, model: FlowModel, blocks: Sequence[int] | None = None) -> None:
        self.model = model
        self.block_list = find_blocks(model.transformer)
        n = len(self.block_list)
        chosen = [n // 2] if not blocks else list(blocks)
        bad = [b for b in chosen if not -n <= b < n]
        if bad:
            raise ValueError(f"discriminator_blocks {bad} out of range for a teacher with {n} blocks")
        self.indices = sorted({b % n for b in chosen})

    def dims(self, x_t: Tensor, t: Tensor, cond: PromptEmbeds, *, guidance: float | None = None) -> list[int]:
        """Feature width of each chosen block, from one probe forward on ``x_t`` (e.g. one zero sample)."""
        with torch.no_grad():
            return [f.shape[-1] for f in self(x_t, t, cond, guidance=guidance)]

    def __call__(
        self, x_t: Tensor, t: Tensor, cond: PromptEmbeds, *, guidance: float | None = None
    ) -> list[Tensor]:
        """Features ``[B, N, D]`` per chosen block for noised inputs ``x_t`` at times ``t`` [B]."""
        found: dict[int, Tensor] = {}
        last = self.indices[-1]
        # where a block's tuple output keeps the media tokens (the last, unless the family says otherwise)
        media_index = getattr(self.model, "block_media_index", -1)

        def hook(index: int):
            def fn(module: nn.Module, args: Any, output: Any) -> None:
                out = output[media_index] if isinstance(output, tuple) else output
                found[index] = out
                if index == last:
                    raise _StopForward

            return fn

        handles = [self.block_list[i].register_forward_hook(hook(i)) for i in self.indices]
        try:
            self.model.velocity(x_t, t, cond, guidance=guidance)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return [found[i] for i in self.indices]


class DiscriminatorHeads(nn.Module):
    """One small head per teacher feature map: per-token MLP, mean over tokens, linear to a logit.

        l_k = w_k^T mean_n silu(W2 silu(W1 LN(f_k,n))),   logits = [l_1, ..., l_H]  -> [B, H]

    Args:
        dims: feature width of each head's input.
        hidden: hidden width.
    """

    def __init__(self, dims: Sequence[int], *, hidden: int = 128) -> None:
        super().__init__()
        if not dims:
            raise ValueError("DiscriminatorHeads needs at least one feature map")
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(d, elementwise_affine=False),
                nn.Linear(d, hidden),
                nn.SiLU(),
                nn.Linear(hidden, hidden),
                nn.SiLU(),
            )
            for d in dims
        )
        self.out = nn.ModuleList(nn.Linear(hidden, 1) for _ in dims)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.heads):
            raise ValueError(
                f"DiscriminatorHeads has {len(self.heads)} heads, got {len(features)} feature maps"
            )
        logits = []
        for head, out, f in zip(self.heads, self.out, features, strict=True):
            h = head(f.to(out.weight.dtype)).mean(dim=1)  # [B, hidden]: pooled over tokens
            logits.append(out(h))  # [B, 1]
        return torch.cat(logits, dim=1)  # [B, H]
