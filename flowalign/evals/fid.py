"""Frechet distance between feature distributions (FID) with a feature extractor chosen by the caller.

    FD(N(mu1, S1), N(mu2, S2)) = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)

(Heusel et al. 2017, eq. 6; tr((S1 S2)^1/2) equals tr((S1^1/2 S2 S1^1/2)^1/2) because the two
matrices are similar.) The matrix square roots are taken by symmetric eigen-decompositions in float64,
clamping the tiny negative eigenvalues that rounding leaves on singular covariances, so the result is
real and stable even when N < D.

Feature extractors:

- :func:`load_fid_extractor` picks the extractor a weights file implies. The standard
  ``inception-2015-12-05.pt`` TorchScript gives clean-fid's features (:mod:`flowalign.evals.clean_inception`),
  so the FID is comparable with papers that use clean-fid; KID on the same features is in
  :mod:`flowalign.evals.kid`. ``clip:<model>`` gives CLIP image embeddings (CLIP-FD).
- :func:`load_inception_features` builds torchvision's Inception-v3 from a **local** weights file
  (this project never downloads weights). Its features differ from the TensorFlow graph's (weights and
  resizing), so its FID compares runs of this tool with each other, not with papers' tables.
- :func:`toy_features` describes a toy-world picture by what the exact oracle detects (one-hot
  shape/colour/size/position, colour, extent, centre, quality terms): a cheap, interpretable
  "toy FID" against :func:`toy_reference_media`, renders of the same captions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FeatureExtractor",
    "InceptionFeatures",
    "extract_features",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "load_fid_extractor",
    "load_inception_features",
    "toy_features",
    "toy_features_from_detections",
    "toy_reference_media",
]

FeatureExtractor = Callable[[Tensor], Tensor]
"""media [B, 3, H, W] (or [B, T, 3, H, W]) float in [0, 1] -> features [B, D]."""


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [D] and covariance [D, D] (unbiased, float64) of features [N, D], N >= 2."""
    features = features.detach().double()
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {tuple(features.shape)}")
    mu = features.mean(dim=0)
    centred = features - mu
    return mu, centred.T @ centred / (features.shape[0] - 1)


def _sqrt_psd(matrix: Tensor) -> Tensor:
    """Symmetric square root of a positive semi-definite matrix (negative rounding noise clamped)."""
    vals, vecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Frechet (2-Wasserstein squared) distance between two Gaussians (module docstring equation).

    Args:
        mu1: [D] mean of the first distribution.
        sigma1: [D, D] covariance (symmetric positive semi-definite).
        mu2: [D] mean of the second.
        sigma2: [D, D] covariance.

    Returns:
        The distance, >= 0 up to rounding.
    """
    mu1, mu2, sigma1, sigma2 = (x.detach().double() for x in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"frechet_distance: shapes do not match: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
            f"sigma {tuple(sigma1.shape)}/{tuple(sigma2.shape)}"
        )
    root1 = _sqrt_psd(sigma1)
    cross = root1 @ sigma2 @ root1  # similar to S1 S2, symmetric PSD
    cross_eigs = torch.linalg.eigvalsh((cross + cross.T) / 2).clamp_min(0)
    trace = torch.trace(sigma1) + torch.trace(sigma2) - 2 * cross_eigs.sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + trace)


def fid_from_features(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [N_a, D] and [N_b, D]."""
    if features_a.shape[1:] != features_b.shape[1:]:
        raise ValueError(f"feature sizes differ: {tuple(features_a.shape)} vs {tuple(features_b.shape)}")
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


@torch.no_grad()
def extract_features(
    batches: Iterable[Tensor], extractor: FeatureExtractor, *, device: str | torch.device = "cpu"
) -> Tensor:
    """Run an extractor over media batches; videos [B, T, 3, H, W] get the mean of their frames' features.

    Returns:
        [N, D] float32 features on the CPU.
    """
    out = []
    for media in batches:
        media = media.to(device)
        if media.ndim == 5:
            b, t = media.shape[:2]
            feats = extractor(media.reshape(b * t, *media.shape[2:])).reshape(b, t, -1).mean(dim=1)  # [B, D]
        else:
            feats = extractor(media)
        out.append(feats.float().cpu())
    if not out:
        raise ValueError("extract_features: no media")
    return torch.cat(out)


class InceptionFeatures(nn.Module):
    """torchvision Inception-v3 as a 2048-d pool-feature extractor for [0, 1] images of any size.

    Images are resized to 299x299 (bilinear, antialiased) and mapped to [-1, 1], the input range the
    torchvision weights expect after their ``transform_input`` step.
    """

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        self.net.fc = nn.Identity()
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> [B, 2048] float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionFeatures expects images [B, 3, H, W], got {tuple(images.shape)}")
        dtype = next(self.parameters()).dtype  # resize in fp32, run in the network's dtype (bf16 on GPU)
        x = F.interpolate(
            images.float(), size=(299, 299), mode="bilinear", align_corners=False, antialias=True
        )
        return self.net((x * 2 - 1).to(dtype)).float()


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` or torch ``.pth`` weights file (torch files with ``weights_only``)."""
    if not path.is_file():
        raise FileNotFoundError(f"feature-extractor weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # refused unpickling (code in the pickle), a legacy or corrupt file
            raise ValueError(f"{path}: cannot be read as a weights-only torch state dict ({err})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def load_inception_features(
    weights: str | os.PathLike[str], *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> InceptionFeatures:
    """Inception-v3 features from a local torchvision-layout weights file.

    Args:
        weights: ``.safetensors`` or ``.pth``/``.pt`` (read with ``weights_only=True``) holding a
            torchvision ``inception_v3`` state dict, e.g. ``inception_v3_google-0cc3c7bd.pth``.
            ``AuxLogits.*`` and ``fc.*`` entries are ignored.
        device: where the network runs.
        dtype: its parameter dtype.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an Inception-v3 state dict (naming missing or unexpected keys).
    """
    path = Path(weights)
    state = {
        k.removeprefix("module."): v
        for k, v in read_state_dict(path).items()
        if not k.removeprefix("module.").startswith(("AuxLogits.", "fc."))
    }
    model = InceptionFeatures()
    missing, unexpected = model.net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: not a torchvision inception_v3 state dict: {len(missing)} missing key(s) "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return model.to(device=device, dtype=dtype).eval()


def load_fid_extractor(
    weights: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[FeatureExtractor, dict[str, Any]]:
    """The FID feature extractor a weights file implies, and a description of it for the report.

    The standard ``inception-2015-12-05.pt`` TorchScript (or a folder holding it) gives clean-fid's
    features (:mod:`flowalign.evals.clean_inception`), comparable with published FIDs; any other file is
    read as torchvision Inception-v3 weights (:func:`load_inception_features`), comparable only between
    runs of this tool. ``clip:<model>`` gives CLIP image embeddings (CLIP-FD) from any model the ``clip``
    reward loads. The description names the extractor, the file and its sha256.
    """
    from flowalign.evals.clean_inception import STANDARD_NAME, is_torchscript_archive, load_clean_inception
    from flowalign.files import sha256_file

    if str(weights).startswith("clip:"):
        from flowalign.rewards.backbones import load_clip_backbone

        backbone = load_clip_backbone(str(weights)[5:], device=device)
        return backbone.image_features, {"extractor": f"CLIP image embeddings ({backbone.source})",
                                         "comparable_with_papers": False}  # fmt: skip
    path = Path(weights)
    standard = path.is_dir() or (path.is_file() and is_torchscript_archive(path))
    if standard:
        extractor: FeatureExtractor = load_clean_inception(path, device=device)
        path = path / STANDARD_NAME if path.is_dir() else path
        name = "clean-fid Inception-v3 (TF 2015-12-05 graph, PIL bicubic resize)"
    else:
        extractor = load_inception_features(path, device=device)
        name = "torchvision Inception-v3 (bilinear resize; not comparable with published FIDs)"
    return extractor, {
        "extractor": name,
        "weights": path.name,
        "sha256": sha256_file(path),
        "comparable_with_papers": standard,
    }


def toy_features(media: Tensor) -> Tensor:
    """Oracle-detected attributes of toy images or clips as feature vectors.

    Per sample: one-hot shape (5), colour (8), size (2), position (5) and, for clips, motion (5);
    presence; the detected colour (3); extent, centre (2); visual quality (and motion quality for
    clips). Attributes of an absent object are all zero.

    Args:
        media: [B, 3, H, W] or [B, T, 3, H, W] float in [0, 1].

    Returns:
        [B, D] float32, D = 28 for images and 34 for clips.
    """
    from flowalign.toy.oracles import detect_attributes

    return toy_features_from_detections(detect_attributes(media), is_video=media.ndim == 5)


def toy_features_from_detections(detections: Sequence[Mapping[str, Any]], *, is_video: bool) -> Tensor:
    """:func:`toy_features` from rows :func:`flowalign.toy.oracles.detect_attributes` already returned."""
    from flowalign.toy.world import COLOURS, MOTIONS, POSITIONS, SHAPES, SIZES

    vocabs = [("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS)]
    if is_video:
        vocabs.append(("motion", MOTIONS))
    rows = []
    for det in detections:
        vec: list[float] = []
        for key, vocab in vocabs:
            vec += [float(det[key] == word) for word in vocab]
        vec += [float(det["present"]), *det["rgb"], det["extent"], det["cx"], det["cy"], det["vq"]]
        if is_video:
            vec.append(det["mq"])
        rows.append(vec)
    return torch.tensor(rows, dtype=torch.float32)


def toy_reference_media(
    prompts: Sequence[str], *, seed: int = 0, size: int = 32, num_frames: int | None = None
) -> Tensor:
    """Clean renders of toy captions with the world's own jitter: the reference set of a toy FID.

    Prompt i gets a scene whose jitter comes from ``numpy.random.default_rng([seed, i])``, drawn as
    :func:`flowalign.toy.world.sample_scene` draws it.

    Args:
        prompts: toy captions (image captions, or clip captions with ``num_frames``).
        seed: jitter seed.
        size: side in pixels.
        num_frames: frames per clip for video captions; None renders images.

    Returns:
        [N, 3, size, size] images or [N, T, 3, size, size] clips in [0, 1].
    """
    from flowalign.toy.render import render_images, render_videos
    from flowalign.toy.world import (
        ANCHORS,
        EXTENT,
        EXTENT_JITTER,
        POSITION_JITTER,
        TRAVEL,
        TRAVEL_JITTER,
        Scene,
        parse_caption,
    )

    scenes = []
    for i, prompt in enumerate(prompts):
        attrs = parse_caption(prompt)
        u = np.random.default_rng([seed, i]).uniform(-1.0, 1.0, size=4)
        ax, ay = ANCHORS[attrs.position]
        travel = 0.0 if attrs.motion in (None, "still") else TRAVEL + TRAVEL_JITTER * float(u[3])
        scenes.append(
            Scene(
                attributes=attrs,
                extent=EXTENT[attrs.size] + EXTENT_JITTER * float(u[0]),
                cx=ax + POSITION_JITTER * float(u[1]),
                cy=ay + POSITION_JITTER * float(u[2]),
                travel=travel,
            )
        )
    if num_frames is None:
        return render_images(scenes, size=size)
    return render_videos(scenes, size=size, num_frames=num_frames)
