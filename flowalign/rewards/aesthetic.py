"""LAION's improved aesthetic predictor: an MLP on L2-normalised CLIP ViT-L/14 image embeddings.

Reference: christophschuhmann/improved-aesthetic-predictor (``simple_inference.py``). The published
head ``sac+logos+ava1-l14-linearMSE.pth`` is a plain state dict of

    layers.0: Linear(768, 1024)   layers.1: Dropout(0.2)
    layers.2: Linear(1024, 128)   layers.3: Dropout(0.2)
    layers.4: Linear(128, 64)     layers.5: Dropout(0.1)
    layers.6: Linear(64, 16)      layers.7: Linear(16, 1)

with no activations (the "linearMSE" variant), applied to e / |e| where e is OpenAI CLIP
ViT-L/14's image embedding. The score (roughly 1-10) ignores the prompt. The head runs in float32
whatever the backbone's dtype, as the reference casts embeddings to float.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowalign.rewards.backbones import (
    ClipBackbone,
    load_clip_backbone,
    load_state_dict_file,
    load_state_dict_strict,
)
from flowalign.rewards.base import RewardModel

__all__ = ["AESTHETIC_HEAD_URL", "AestheticMLP", "AestheticReward", "load_aesthetic"]

AESTHETIC_HEAD_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """The predictor head, with the published layer indices so its state dict loads as is.

    Args:
        input_size: CLIP embedding width (768 for ViT-L/14).
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        """Scores [N] for L2-normalised embeddings [N, input_size]."""
        return self.layers(embeddings)[:, 0]


class AestheticReward(RewardModel):
    """Aesthetic score = MLP(e / |e|), e the CLIP image embedding; prompts are not used.

    Args:
        backbone: CLIP backbone (OpenAI ViT-L/14 for the published head).
        head: the predictor MLP, input width = ``backbone.embed_dim``.
        batch_size: images per forward pass.
    """

    name = "aesthetic"
    dimensions = ("aesthetic",)
    media_kind = "image"
    needs_prompts = False
    differentiable = True

    def __init__(self, backbone: ClipBackbone, head: AestheticMLP, *, batch_size: int = 16) -> None:
        super().__init__(batch_size=batch_size, text_cache_size=0)
        in_features = head.layers[0].in_features
        if in_features != backbone.embed_dim:
            raise ValueError(
                f"aesthetic: head expects {in_features}-d embeddings but the backbone gives {backbone.embed_dim}-d"
            )
        self.backbone = backbone
        self.head = head

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        out = super()._apply(fn, recurse)
        self.head.float()  # the head stays float32 (see module docstring)
        return out

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        embeddings = F.normalize(self.backbone.image_features(images).float(), dim=-1)  # [N, D]
        return {"aesthetic": self.head(embeddings)}


def load_aesthetic(
    *,
    head: str | Path,
    model: str | Path = "ViT-L-14",
    pretrained: str | None = "openai",
    processor: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> AestheticReward:
    """Load the aesthetic predictor: a CLIP backbone plus the published MLP head.

    Args:
        head: the head's state dict file (``sac+logos+ava1-l14-linearMSE.pth`` from
            ``AESTHETIC_HEAD_URL``, or a ``.safetensors`` copy with the same keys).
        model, pretrained, processor: the CLIP backbone (see
            :func:`flowalign.rewards.backbones.load_clip_backbone`); the default open_clip
            ``ViT-L-14``/``openai`` is OpenAI's CLIP ViT-L/14 as used by the reference.
        device, dtype, batch_size: where, in what precision and how many images per pass.

    Raises:
        FileNotFoundError: ``head`` does not exist (the message gives the download URL).
        ValueError: the head's keys/shapes differ from the published layout, or its input width
            differs from the backbone's embedding width.
    """
    head_path = Path(head)
    if not head_path.is_file():
        raise FileNotFoundError(
            f"aesthetic head not found: {head_path} (download it from {AESTHETIC_HEAD_URL})"
        )
    state = load_state_dict_file(head_path)
    first = state.get("layers.0.weight")
    if first is None or first.ndim != 2:
        raise ValueError(f"{head_path}: missing 'layers.0.weight' [1024, D]; keys are {sorted(state)[:8]}")
    mlp = AestheticMLP(int(first.shape[1]))
    load_state_dict_strict(mlp, {k: v.float() for k, v in state.items()}, source=head_path)
    backbone = load_clip_backbone(
        model, pretrained=pretrained, processor=processor, device=device, dtype=dtype
    )
    mlp.to(device=device).eval().requires_grad_(False)
    return AestheticReward(backbone, mlp, batch_size=batch_size)
