"""Image-text similarity scorers on CLIP backbones: CLIPScore, PickScore, HPSv2 / HPSv2.1.

All three embed the image and the prompt with a CLIP dual encoder and map the cosine
similarity c = <f_img / |f_img|, f_txt / |f_txt|> to a score:

    clip       w * max(c, 0), w = 100                    (torchmetrics' CLIPScore; Hessel et al.
                                                          2021 use w = 2.5: pass scale=2.5)
    pickscore  exp(logit_scale) * c                      (Kirstain et al. 2023, PickScore_v1 README)
    hpsv2      c                                         (hpsv2.score(); its benchmark tables
                                                          report 100 * c: pass scale=100)

Videos are scored per frame and averaged. Text embeddings are cached per prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from flowalign.rewards.backbones import ClipBackbone, load_clip_backbone, load_open_clip
from flowalign.rewards.base import RewardModel
from flowalign.rewards.preprocess import ImagePreprocess

__all__ = [
    "ClipSimilarityReward",
    "HPS_CHECKPOINTS",
    "hps_preprocess",
    "load_clip",
    "load_hpsv2",
    "load_pickscore",
]

Similarity = Literal["clipscore", "logit", "cosine"]


class ClipSimilarityReward(RewardModel):
    """Reward = a fixed map of the CLIP image-prompt cosine similarity.

    Args:
        backbone: the CLIP dual encoder with its preprocessing.
        name: registry name; also the single dimension's name.
        similarity: ``"clipscore"`` (scale * max(c, 0)), ``"logit"`` (exp(logit_scale) * c) or
            ``"cosine"`` (scale * c).
        scale: multiplier for ``"clipscore"`` and ``"cosine"``.
        batch_size: images per forward pass.
        text_cache_size: prompts kept in the text-embedding LRU cache.
    """

    media_kind = "image"
    differentiable = True

    def __init__(
        self,
        backbone: ClipBackbone,
        *,
        name: str,
        similarity: Similarity,
        scale: float = 1.0,
        batch_size: int = 16,
        text_cache_size: int = 1024,
    ) -> None:
        self.name = name
        super().__init__(batch_size=batch_size, text_cache_size=text_cache_size)
        if similarity not in ("clipscore", "logit", "cosine"):
            raise ValueError(
                f"{name}: similarity must be 'clipscore', 'logit' or 'cosine', got {similarity!r}"
            )
        self.backbone = backbone
        self.dimensions = (name,)
        self.similarity = similarity
        self.scale = float(scale)

    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """Cached, unnormalised text embeddings [N, D] for N prompts."""
        with torch.no_grad():
            return self.text_cache.get(prompts, self.backbone.text_features)

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        assert prompts is not None
        image_features = self.backbone.image_features(images)  # [N, D]
        text_features = self.text_embeddings(prompts).to(image_features.device)  # [N, D]
        cos = ClipBackbone.cosine(image_features, text_features)  # [N] float32
        if self.similarity == "clipscore":
            score = self.scale * cos.clamp(min=0.0)
        elif self.similarity == "logit":
            score = self.backbone.logit_scale.float().exp() * cos
        else:
            score = self.scale * cos
        return {self.name: score}


def load_clip(
    *,
    model: str | Path = "ViT-L-14",
    pretrained: str | None = "openai",
    processor: str | Path | None = None,
    scale: float = 100.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> ClipSimilarityReward:
    """CLIPScore: ``scale * max(cos, 0)`` with ``scale = 100`` (torchmetrics' convention).

    torchmetrics reports CLIPScore as 100 * max(cos, 0) (values around 20-35 for good T2I
    samples), which is what T2I papers and diffusers' evaluation guide quote; Hessel et al.'s
    original w = 2.5 is ``scale=2.5``.

    Args:
        model: open_clip name (with ``pretrained``), ``local-dir:``/``hf-hub:`` open_clip model,
            or a transformers ``CLIPModel`` folder / hub id (e.g. ``openai/clip-vit-large-patch14``,
            torchmetrics' default).
        pretrained: open_clip pretrained tag (ignored for folders and transformers models).
        processor: transformers tokenizer/image-processor source when ``model`` lacks them.
        scale: the w above.
        device, dtype, batch_size: where, in what precision and how many images per pass.
    """
    backbone = load_clip_backbone(
        model, pretrained=pretrained, processor=processor, device=device, dtype=dtype
    )
    return ClipSimilarityReward(
        backbone, name="clip", similarity="clipscore", scale=scale, batch_size=batch_size
    )


PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def load_pickscore(
    *,
    model: str | Path = PICKSCORE_MODEL,
    processor: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> ClipSimilarityReward:
    """PickScore: ``exp(logit_scale) * cos`` on a transformers ``CLIPModel``.

    Args:
        model: the PickScore ``CLIPModel`` folder or hub id.
        processor: tokenizer + ``preprocessor_config.json`` source; defaults to ``model`` when it
            has them, else the reference's ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
        device, dtype, batch_size: where, in what precision and how many images per pass.
    """
    if processor is None:
        folder = Path(str(model))
        if folder.is_dir():
            if not (folder / "preprocessor_config.json").is_file():
                processor = PICKSCORE_PROCESSOR
        elif str(model) == PICKSCORE_MODEL:
            processor = PICKSCORE_PROCESSOR  # PickScore_v1 ships no tokenizer/processor files
    backbone = load_clip_backbone(model, processor=processor, device=device, dtype=dtype)
    return ClipSimilarityReward(backbone, name="pickscore", similarity="logit", batch_size=batch_size)


HPS_HUB_REPO = "xswu/HPSv2"
HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def hps_preprocess(preprocess_cfg: dict) -> ImagePreprocess:
    """HPSv2's evaluation transform: ``ToTensor`` -> ``ResizeMaxSize`` (longest side to S, bicubic,
    on the float tensor, zero pad to S x S) -> ``Normalize``.

    The resize runs on floats in one 2-D pass with torchvision's tensor default ``antialias=True``
    and no clipping, so the tensor path reproduces it to float precision.
    """
    size = preprocess_cfg.get("size", 224)
    side = int(size if isinstance(size, int) else size[0])
    return ImagePreprocess(
        resize_size=side,
        crop_size=(side, side),
        mean=tuple(preprocess_cfg["mean"]),
        std=tuple(preprocess_cfg["std"]),
        resize_mode="longest_pad",
        interpolation="bicubic",
        clamp=False,
        fill=0.0,
    )


def load_hpsv2(
    *,
    version: Literal["v2.0", "v2.1"] = "v2.1",
    checkpoint: str | Path | None = None,
    model: str = "ViT-H-14",
    scale: float = 1.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> ClipSimilarityReward:
    """HPSv2 / HPSv2.1: cosine similarity from an open_clip ViT-H-14 fine-tuned by HPS.

    Args:
        version: ``"v2.0"`` or ``"v2.1"`` (their scores are not comparable with each other).
        checkpoint: HPS's checkpoint file (``{"state_dict": ...}`` ``.pt``, or ``.safetensors``).
            Default: ``HPS_v2[.1]_compressed.pt`` from the ``xswu/HPSv2`` hub repo.
        model: open_clip architecture (``"ViT-H-14"``) or a ``local-dir:`` folder with
            ``open_clip_config.json`` (its own weights, if any, are replaced by the checkpoint).
        scale: 1 reproduces ``hpsv2.score()``; 100 the HPS benchmark tables.
        device, dtype, batch_size: where, in what precision and how many images per pass.
    """
    if version not in HPS_CHECKPOINTS:
        raise ValueError(f"hpsv2: version must be one of {sorted(HPS_CHECKPOINTS)}, got {version!r}")
    if checkpoint is None:
        from huggingface_hub import hf_hub_download

        checkpoint = hf_hub_download(HPS_HUB_REPO, HPS_CHECKPOINTS[version])
    backbone = load_open_clip(model, checkpoint=checkpoint, device=device, dtype=dtype, allow_random=True)
    backbone.preprocess = hps_preprocess(dict(backbone.model.visual.preprocess_cfg))
    name = "hpsv2" if version == "v2.0" else "hpsv2.1"
    return ClipSimilarityReward(backbone, name=name, similarity="cosine", scale=scale, batch_size=batch_size)
