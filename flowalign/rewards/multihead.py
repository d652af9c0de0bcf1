"""flowalign's own multi-dimensional reward model: one head per dimension on a CLIP-style backbone.

Architecture (after VideoReward, docs/algorithms.md 1A; the backbone is an open_clip CLIP instead of a VLM):

    p_j, z_j = E_img(frame_j)                   pooled embedding [E] and patch tokens [L, W] (open_clip ViT)
    a_j = A(z_j)                                token features [L, H], A = Linear + GELU
    g_j = G(AvgPool_(grid x grid)(a_j))          token features on a coarse grid [grid^2 H/4] (where things are)
    f_j = [p_j ; mean_l a_j ; max_l a_j ; g_j]  frame feature (max pooling keeps small local defects)
    images: v = P(f)                            P = LayerNorm + Linear + GELU -> [H]
    videos: d_j = f_j - f_(j-1)  (d_1 = 0)      frame differences make motion visible
            h_j = Conv1d(GELU(Conv1d([f_j ; d_j])))      temporal layer, kernel 3, over the frames
            v = P([mean_j f_j ; mean_j h_j ; max_j h_j ; f_T - f_1])    (f_T - f_1: where it went)
    u = Q(E_txt(prompt))                        pooled text embedding, Q = LayerNorm + Linear + GELU -> [H]
    c = Attn(query u, keys/values mean_j a_j)   the prompt reads the (frame-averaged) patch tokens
    r_k = MLP_k(v)                              k in the visual dimensions (vq, mq)
    r_k = MLP_k([v ; u ; v * u ; c ; c * u])    k in ``text_dimensions`` (ta)

A vision tower without patch tokens (open_clip's ResNet or timm towers) gives f_j = p_j and no c.

As in VideoReward's "separate tokens" layout, the visual-quality and motion-quality heads never see
the prompt (their scores do not depend on it; a test checks it) and the text-alignment head reads both.
Per-dimension normalisation (mean, std) of the raw scores is stored with the model
(:attr:`MultiHeadRewardModel.normalisation`, used by :class:`~flowalign.rewards.combine.RewardCombiner`).

Backbones: either a tiny CLIP built from config dicts (open_clip ``CLIPVisionCfg``/``CLIPTextCfg``
fields) with a word-level tokenizer trained on the training prompts (the toy world's setting), or an
open_clip architecture by name (``open_clip_model="ViT-B-32"``, weights from ``pretrained`` when
built, from ``model.safetensors`` when loaded) with open_clip's own tokenizer.

Files: ``config.json``, ``model.safetensors`` and, for word tokenizers, ``tokenizer/``
(:mod:`flowalign.rewards.multihead_files`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowalign.rewards.base import RewardModel
from flowalign.rewards.multihead_files import (
    CONFIG_NAME,
    MultiHeadLoadError,
    read_config_blob,
    read_tokenizer,
    read_weights,
    write_folder,
)
from flowalign.rewards.preprocess import ImagePreprocess, preprocess_images

__all__ = ["MultiHeadConfig", "MultiHeadLoadError", "MultiHeadRewardModel", "load_multihead"]


@dataclass(kw_only=True)
class MultiHeadConfig:
    """Architecture of a :class:`MultiHeadRewardModel` (saved as ``config.json``)."""

    dimensions: list[str] | None = None
    """Reward dimensions, one head each, e.g. [vq, ta] or [vq, mq, ta] (None: taken from the training data)."""
    media_kind: Literal["image", "video"] | None = None
    """What the model scores: images, or videos through the temporal layer (None: from the training data)."""
    text_dimensions: list[str] = field(default_factory=lambda: ["ta"])
    """Dimensions whose head reads the prompt; the others read visual features only."""
    open_clip_model: str | None = None
    """An open_clip architecture name (e.g. ViT-B-32) for both towers and the tokenizer; None = build from vision/text."""
    embed_dim: int = 64
    """Width E of the image and text embeddings (config-built backbones)."""
    vision: dict[str, Any] = field(
        default_factory=lambda: {
            "image_size": 32,
            "patch_size": 4,
            "width": 64,
            "layers": 3,
            "head_width": 32,
            "pool_type": "avg",
        }
    )
    """open_clip CLIPVisionCfg fields of a config-built vision tower (default: patch tokens mean-pooled)."""
    text: dict[str, Any] = field(
        default_factory=lambda: {"context_length": 16, "width": 64, "heads": 2, "layers": 2}
    )
    """open_clip CLIPTextCfg fields of a config-built text tower (vocabulary from the word tokenizer)."""
    hidden: int = 128
    """Width H of the pooled visual feature, the temporal layer and the heads."""
    grid: int = 3
    """Token features are also average-pooled onto a grid x grid layout (where things are; 0 = off)."""
    normalisation: dict[str, tuple[float, float]] | None = None
    """Per-dimension (mean, std) of the raw scores; None = not calibrated."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (training data, steps, held-out accuracy)."""

    def check(self) -> None:
        """Raise ValueError naming the field unless the config is complete and consistent."""
        dims = self.dimensions
        if not dims or len(set(dims)) != len(dims) or not all(isinstance(d, str) and d for d in dims):
            raise ValueError(f"multihead config: dimensions must be unique non-empty names, got {dims}")
        if self.media_kind not in ("image", "video"):
            raise ValueError(
                f"multihead config: media_kind must be 'image' or 'video', got {self.media_kind!r}"
            )
        unknown = [d for d in self.text_dimensions if d not in dims]
        if unknown:
            raise ValueError(f"multihead config: text_dimensions {unknown} are not in dimensions {dims}")
        if self.embed_dim < 1 or self.hidden < 1:
            raise ValueError(
                f"multihead config: embed_dim and hidden must be >= 1, got {self.embed_dim}, {self.hidden}"
            )


def _mlp(width_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width_in, hidden), nn.GELU(), nn.Linear(hidden, 1))


class _Temporal(nn.Module):
    """[N, T, F] per-frame features -> [N, 2F + 2H]: their mean, the pooled temporal features, f_T - f_1."""

    def __init__(self, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(2 * embed_dim, hidden, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv1d(hidden, hidden, kernel_size=3, padding=1),
            nn.GELU(),
        )

    def forward(self, frames: Tensor) -> Tensor:
        diffs = torch.cat(
            [torch.zeros_like(frames[:, :1]), frames[:, 1:] - frames[:, :-1]], dim=1
        )  # [N, T, E]
        h = self.conv(torch.cat([frames, diffs], dim=2).transpose(1, 2))  # [N, H, T]
        travel = frames[:, -1] - frames[:, 0]  # over the whole clip: the direction of motion
        return torch.cat([frames.mean(dim=1), h.mean(dim=2), h.amax(dim=2), travel], dim=1)


class MultiHeadRewardModel(RewardModel):
    """Multi-dimensional reward model (see the module doc): ``score(media, prompts) -> {dim: [B]}``.

    Build a new one with :meth:`build`, load a saved one with :meth:`from_pretrained` (or
    ``load_reward("multihead", path=...)``). Scores are raw; :meth:`normalise` applies the stored
    per-dimension statistics.

    Args:
        config: a complete :class:`MultiHeadConfig`.
        clip: an open_clip ``CLIP``/``CustomTextCLIP`` providing ``encode_image`` and ``encode_text``.
        tokenizer: a word-level ``PreTrainedTokenizerFast`` (config-built text towers) or an open_clip
            tokenizer (``open_clip_model``).
        preprocess: how media become the vision tower's input.
        batch_size: images (or video frames) per forward pass when scoring.
    """

    name = "multihead"
    differentiable = True

    def __init__(
        self,
        config: MultiHeadConfig,
        clip: nn.Module,
        tokenizer: Any,
        preprocess: ImagePreprocess,
        *,
        batch_size: int = 16,
    ) -> None:
        super().__init__(batch_size=batch_size)
        config.check()
        self.config = config
        self.dimensions = tuple(config.dimensions)
        self.media_kind = config.media_kind
        self.needs_prompts = bool(config.text_dimensions)
        self.clip, self.tokenizer, self.preprocess = clip, tokenizer, preprocess
        e, h = self._embed_width(), config.hidden
        token_width = _token_width(clip.visual)
        self.token_proj = self.text_attn = self.grid_proj = None
        frame_width = e
        if token_width is not None:
            clip.visual.output_tokens = True  # the tower returns (pooled [N, E], tokens [N, L, W])
            self.token_proj = nn.Sequential(nn.Linear(token_width, h), nn.GELU())
            self.text_attn = nn.MultiheadAttention(h, num_heads=max(1, h // 32), batch_first=True)
            self.grid_proj = nn.Linear(h, max(1, h // 4)) if config.grid > 0 else None
            frame_width = e + 2 * h + (config.grid**2 * max(1, h // 4) if config.grid > 0 else 0)
        self.temporal = _Temporal(frame_width, h) if config.media_kind == "video" else None
        width_in = 2 * frame_width + 2 * h if config.media_kind == "video" else frame_width
        self.visual_proj = nn.Sequential(nn.LayerNorm(width_in), nn.Linear(width_in, h), nn.GELU())
        self.text_proj = nn.Sequential(nn.LayerNorm(e), nn.Linear(e, h), nn.GELU())
        text_in = 5 * h if token_width is not None else 3 * h
        self.heads = nn.ModuleDict(
            {d: _mlp(text_in if d in config.text_dimensions else h, h) for d in config.dimensions}
        )

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters that cannot affect the scores (freeze them when training: DDP needs every trainable
        one used): CLIP's contrastive temperature, and the text side when no head reads the prompt."""
        temperature = [getattr(self.clip, n, None) for n in ("logit_scale", "logit_bias")]
        unused = [p for p in temperature if isinstance(p, nn.Parameter)]
        if not self.config.text_dimensions:
            keep = {id(p) for p in self.clip.visual.parameters()} | {id(p) for p in unused}
            unused += [p for p in self.clip.parameters() if id(p) not in keep]
            unused += list(self.text_proj.parameters())
            unused += list(self.text_attn.parameters()) if self.text_attn is not None else []
        return unused

    def _embed_width(self) -> int:
        if self.config.open_clip_model is None:
            return self.config.embed_dim
        return int(self.clip.visual.output_dim)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        config: MultiHeadConfig,
        *,
        corpus: Sequence[str] | None = None,
        tokenizer: Any | None = None,
        pretrained: str | None = None,
        seed: int = 0,
        batch_size: int = 16,
    ) -> MultiHeadRewardModel:
        """A new model with freshly initialised heads (and towers, unless ``pretrained`` is given).

        Args:
            config: the architecture (dimensions and media_kind set).
            corpus: prompts the word tokenizer is trained on (config-built text towers; default: the
                toy world's captions).
            tokenizer: an existing word tokenizer to use instead (e.g. that of a model whose weights
                will be copied in, so that token ids agree).
            pretrained: open_clip pretrained tag or weights file for ``config.open_clip_model``.
            seed: seed of the initialisation (the global RNG is left untouched).
            batch_size: default scoring batch size.
        """
        config = dataclasses.replace(config)
        config.check()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if config.open_clip_model is not None:
                clip, tokenizer, preprocess = _open_clip_parts(config.open_clip_model, pretrained)
            else:
                if pretrained is not None:
                    raise ValueError("multihead: pretrained weights need config.open_clip_model")
                from flowalign.models.toy import build_word_tokenizer, toy_corpus

                length = int(config.text.get("context_length", 16))
                if tokenizer is None:
                    tokenizer = build_word_tokenizer(list(corpus or toy_corpus()), max_length=length)
                clip, preprocess = _config_clip(config, tokenizer)
            return cls(config, clip, tokenizer, preprocess, batch_size=batch_size)

    def load_matching_weights(self, state: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
        """Copy every tensor of ``state`` whose name and shape match one of this model's (e.g. the towers
        of an image reward model into a video one); the others keep their values.

        Returns:
            (names copied, names of this model's tensors left as they were).
        """
        own = self.state_dict()
        copied = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
        self.load_state_dict({k: state[k] for k in copied}, strict=False)
        return copied, sorted(set(own) - set(copied))

    # ------------------------------------------------------------------ normalisation
    @property
    def normalisation(self) -> dict[str, tuple[float, float]] | None:  # type: ignore[override]
        """Per-dimension (mean, std) stored with the model, or None if not calibrated."""
        return self.config.normalisation

    def set_normalisation(self, stats: Mapping[str, Sequence[float]]) -> None:
        """Store per-dimension (mean, std).

        Raises:
            ValueError: an unknown dimension, a non-finite mean or std, or std <= 0.
        """
        unknown = sorted(set(stats) - set(self.dimensions))
        if unknown:
            raise ValueError(
                f"multihead: normalisation names unknown dimension(s) {unknown}; have {list(self.dimensions)}"
            )
        checked = {}
        for dim, (mean, std) in stats.items():
            mean, std = float(mean), float(std)
            if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise ValueError(
                    f"multihead: normalisation of {dim!r} needs finite mean and std > 0, got {(mean, std)}"
                )
            checked[dim] = (mean, std)
        self.config.normalisation = checked or None

    def normalise(self, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """(r_k - mean_k) / std_k per dimension ((0, 1) for dimensions without statistics)."""
        stats = self.config.normalisation or {}
        return {d: (r - stats.get(d, (0.0, 1.0))[0]) / stats.get(d, (0.0, 1.0))[1] for d, r in scores.items()}

    # ------------------------------------------------------------------ scoring
    def train(self, mode: bool = True) -> MultiHeadRewardModel:
        self.text_cache.clear()  # cached text embeddings would go stale once the weights change
        return super().train(mode)

    def _tokens(self, prompts: list[str]) -> Tensor:
        if self.config.open_clip_model is not None:
            return self.tokenizer(prompts)
        return self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids  # fmt: skip

    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """Projected prompt features [N, H] (cached per prompt when no gradient is needed)."""

        def encode(texts: list[str]) -> Tensor:
            return self.text_proj(self.clip.encode_text(self._tokens(texts).to(self.device)))

        if self.training or torch.is_grad_enabled():
            return encode(prompts)
        return self.text_cache.get(prompts, encode)

    def _frame_features(self, frames: Tensor) -> tuple[Tensor, Tensor | None]:
        """Frame features f [N, F] and token features a [N, L, H] (None without patch tokens)."""
        pixels = preprocess_images(frames, self.preprocess).to(device=self.device, dtype=self.dtype)
        out = self.clip.encode_image(pixels)
        if self.token_proj is None:
            return out, None  # [N, E]
        pooled, tokens = out  # [N, E], [N, L, W]
        a = self.token_proj(tokens)  # [N, L, H]
        parts = [pooled, a.mean(dim=1), a.amax(dim=1)]
        if self.grid_proj is not None:
            gh, gw = self.clip.visual.grid_size
            grid = F.adaptive_avg_pool2d(a.transpose(1, 2).reshape(a.shape[0], -1, gh, gw), self.config.grid)
            parts.append(self.grid_proj(grid.flatten(2).transpose(1, 2)).flatten(1))  # [N, g*g*H/4]
        return torch.cat(parts, dim=1), a

    def _heads(self, visual: Tensor, tokens: Tensor | None, prompts: list[str] | None) -> dict[str, Tensor]:
        v = self.visual_proj(visual)  # [N, H]
        out, text = {}, None
        for dim, head in self.heads.items():
            if dim not in self.config.text_dimensions:
                out[dim] = head(v).squeeze(1)
                continue
            if prompts is None:
                raise ValueError(f"multihead: dimension {dim!r} needs prompts")
            if text is None:
                u = self.text_embeddings(prompts)  # [N, H]
                text = [v, u, v * u]
                if tokens is not None:
                    c = self.text_attn(u[:, None], tokens, tokens, need_weights=False)[0][:, 0]  # [N, H]
                    text += [c, c * u]
                text = torch.cat(text, dim=1)
            out[dim] = head(text).squeeze(1)
        return out

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        features, tokens = self._frame_features(images)
        return self._heads(features, tokens, prompts)

    def _score_videos(self, videos: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        if self.temporal is None:
            return super()._score_videos(videos, prompts)  # an image model: mean of per-frame scores
        n, t = videos.shape[:2]
        features, tokens = self._frame_features(videos.reshape(n * t, *videos.shape[2:]))  # [N*T, F]
        if tokens is not None:
            tokens = tokens.reshape(n, t, *tokens.shape[1:]).mean(dim=1)  # [N, L, H]: averaged over frames
        return self._heads(self.temporal(features.reshape(n, t, -1)), tokens, prompts)

    def forward(self, media: Tensor, prompts: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Score the whole batch in one pass (training); differentiable when grad is enabled."""
        frames = media.shape[0] * (media.shape[1] if media.ndim == 5 else 1)
        return self.score(media, prompts, batch_size=frames, differentiable=torch.is_grad_enabled())

    # ------------------------------------------------------------------ files
    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write ``config.json``, ``model.safetensors`` (and ``tokenizer/``) into ``out_dir`` at once
        (see :mod:`flowalign.rewards.multihead_files`)."""
        return write_folder(
            out_dir,
            state=self.state_dict(),
            config=asdict(self.config),
            dtype=str(self.dtype).removeprefix("torch."),
            tokenizer=self.tokenizer if self.config.open_clip_model is None else None,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        batch_size: int = 16,
        trainable: bool = False,
    ) -> MultiHeadRewardModel:
        """Load a saved model (eval mode and frozen unless ``trainable``).

        Raises:
            MultiHeadLoadError: a missing or invalid ``config.json``, ``model.safetensors`` or
                ``tokenizer/`` (the message names the file).
        """
        config = read_config(path)
        if config.open_clip_model is not None:
            clip, tokenizer, preprocess = _open_clip_parts(config.open_clip_model, None)
        else:
            tokenizer = read_tokenizer(path)
            clip, preprocess = _config_clip(config, tokenizer)
        model = cls(config, clip, tokenizer, preprocess, batch_size=batch_size)
        model.load_state_dict(read_weights(path, model.state_dict()))
        saved = read_config_blob(path)[1]
        model = model.to(device=device, dtype=dtype or getattr(torch, saved, torch.float32))
        if trainable:
            return model
        return model.eval().requires_grad_(False)


def read_config(path: str | os.PathLike) -> MultiHeadConfig:
    """Read and validate the :class:`MultiHeadConfig` of a saved model folder.

    Raises:
        MultiHeadLoadError: no such file, invalid JSON, another format, or an invalid entry.
    """
    raw, _ = read_config_blob(path)
    try:
        norm = raw.get("normalisation")
        raw["normalisation"] = (
            None if norm is None else {d: (float(m), float(s)) for d, (m, s) in norm.items()}
        )
        config = MultiHeadConfig(**raw)
        config.check()
    except (KeyError, TypeError, ValueError) as err:
        raise MultiHeadLoadError(
            f"{Path(path) / CONFIG_NAME}: invalid 'config' ({type(err).__name__}: {err})"
        ) from err
    return config


def _token_width(visual: nn.Module) -> int | None:
    """Width W of an open_clip ViT's patch tokens; None for towers that do not return them."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
        return None
    return int(visual.conv1.out_channels)


def _config_clip(config: MultiHeadConfig, tokenizer: Any) -> tuple[nn.Module, ImagePreprocess]:
    """A CLIP built from ``config.vision`` / ``config.text``, its text tower sized to the word tokenizer."""
    import open_clip

    text_cfg = dict(config.text)
    text_cfg.update(
        vocab_size=len(tokenizer),
        context_length=int(tokenizer.model_max_length),
        pad_id=int(tokenizer.pad_token_id),
        eos_id=int(tokenizer.eos_token_id),
        pool_type="eos",  # the word tokenizer's [EOS] is not its largest id (open_clip's default 'argmax')
    )
    clip = open_clip.CLIP(embed_dim=config.embed_dim, vision_cfg=dict(config.vision), text_cfg=text_cfg)
    size = int(config.vision.get("image_size", 224))
    return clip, ImagePreprocess(resize_size=size, crop_size=(size, size))


def _open_clip_parts(name: str, pretrained: str | None) -> tuple[nn.Module, Any, ImagePreprocess]:
    import open_clip

    from flowalign.rewards.preprocess import preprocess_from_open_clip

    if name not in open_clip.list_models():
        raise ValueError(f"multihead: {name!r} is not an open_clip architecture (open_clip.list_models())")
    clip = open_clip.create_model(name, pretrained=pretrained)
    preprocess = preprocess_from_open_clip(dict(open_clip.get_model_preprocess_cfg(clip)))
    return clip, open_clip.get_tokenizer(name), preprocess


def load_multihead(
    *,
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> MultiHeadRewardModel:
    """Registry loader (``load_reward("multihead", path=...)``): a folder written by ``save_pretrained``."""
    return MultiHeadRewardModel.from_pretrained(path, device=device, dtype=dtype, batch_size=batch_size)
