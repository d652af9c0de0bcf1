"""VideoReward (VideoAlign, Liu et al. 2025): visual quality, motion quality and text alignment of a video.

The model is Qwen2-VL-2B-Instruct with three added tokens ``<|VQ_reward|>``, ``<|MQ_reward|>``,
``<|TA_reward|>`` and a bias-free linear head ``rm_head``. The chat prompt ("detailed_special"
template) puts the video first, then the VQ instructions and token, the MQ instructions and token, and
the TA instructions with the user's text prompt and token; with causal attention only TA sees the text.
flowalign does not ship that template (it is VideoAlign's text): the loader reads it from
``prompt_template.txt`` in the checkpoint folder or from ``template=PATH``, checks it holds
``{text_prompt}`` and the three tokens once each in order, and warns when its sha256 differs from the
published text's (:mod:`flowalign.rewards.videoreward_inputs`).
Each dimension reads the last hidden state h at its own token (docs/algorithms.md 1A):

    r_k = w_k . h(<|k_reward|>)        head hidden -> 3: w_k = row k (the diagonal of the 3 x 3 block)
                                       head hidden -> 1: w_k = w, one row shared by the three tokens
    r~_k = (r_k - mean_k) / std_k      per-dimension statistics from model_config.json "inference_config"
    overall = r~_vq + r~_mq + r~_ta

VideoAlign's ``train.sh`` trains a hidden -> 3 head; the released checkpoint's model_config.json is
reported (by independent loaders of it) to say ``output_dim: 1``. Both load: the head's shape decides,
and it must agree with ``model_config.output_dim``.

``score`` returns ``vq``, ``mq``, ``ta`` (normalised when the checkpoint has statistics), ``overall``
and the raw ``vq_raw``, ``mq_raw``, ``ta_raw``. The normalisation is already applied, so
:attr:`normalisation` is None and :class:`~flowalign.rewards.combine.RewardCombiner` sums the z-scores.
Images are refused, as by the reference (it scores video files only); so are videos of fewer than 2
frames.

Video preprocessing (:mod:`flowalign.rewards.videoreward_inputs`) follows the reference on tensors, on
the model's device, batched: frames sampled at ``fps`` = 2 from ``video_fps`` (the media tensor carries
no frame rate, so it is a loader option), resized to multiples of 28 with 128 * 28 * 28 <= h * w <=
``max_frame_pixels`` (448 * 448) and rounded to uint8 levels (gradients pass straight through), then
``(x - mean) / std`` with the processor's CLIP statistics and Qwen2-VL's patch layout.

Deliberate differences from the reference: it decodes an MP4 file (lossy codec); here the frames are the
given tensor. M-RoPE positions follow the reference's transformers version (the text after the video
continues from the largest video position + 1); transformers 5 advances only by the spatial extent,
which differs once a clip has more temporal than spatial merged patches, so positions are computed here
and passed in. The head runs in float32 (the reference: in the model's dtype).

Files: see :mod:`flowalign.rewards.videoreward_files` (hub ``KwaiVGI/VideoReward``: model_config.json,
checkpoint-<step>/model.pth, checkpoint-<step>/tokenizer/), plus prompt_template.txt next to
model_config.json, saved by the user from ``train/prompt_template.py`` in KwaiVGI/VideoAlign. The
Qwen2-VL architecture (``config.json``) and ``preprocessor_config.json`` come from the base model named
in model_config.json (``Qwen/Qwen2-VL-2B-Instruct``) or ``base_model=``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowalign.rewards.base import RewardInputError, RewardModel
from flowalign.rewards.videoreward_files import (
    EMBED_KEY,
    HEAD_KEY,
    chat_template_of,
    find_checkpoint,
    load_state,
    load_tokenizer,
    processor_settings,
    read_model_config,
    resolve_folder,
    single_token_ids,
)
from flowalign.rewards.videoreward_inputs import (
    DIMENSIONS,
    FRAME_FACTOR,
    SPECIAL_TOKENS,
    VIDEO_MIN_PIXELS,
    build_prompt,
    find_template,
    patchify,
    read_template,
    resize_frames,
    sample_frame_indices,
    smart_resize,
)

__all__ = [
    "SPECIAL_TOKENS",
    "VideoReward",
    "VideoRewardSpec",
    "build_prompt",
    "load_videoreward",
    "sample_frame_indices",
    "smart_resize",
]

DEFAULT_REPO = "KwaiVGI/VideoReward"


@dataclass
class VideoRewardSpec:
    """Everything besides weights that scoring needs (read from model_config.json and the base model).

    Attributes:
        special_token_ids: ids of <|VQ_reward|>, <|MQ_reward|>, <|TA_reward|>.
        video_token: the placeholder string the chat template emits once per video (``<|video_pad|>``).
        video_token_id: its id (the config's ``video_token_id``).
        chat_template: the Jinja chat template (Qwen2-VL's).
        prompt_template: the user-turn template with ``{text_prompt}`` and the three reward tokens.
        stats: ``{dim: (mean, std)}`` from inference_config, or None (scores stay raw).
        fps: frames per second sampled from the video (data_config.fps, 2).
        num_frames: a fixed frame count instead of ``fps`` (data_config.num_frames, normally None).
        video_fps: frames per second of the input tensors.
        min_frame_pixels, max_frame_pixels: bounds of h * w per frame for the first resize.
        processor_min_pixels, processor_max_pixels: the image processor's own bounds (second resize).
        image_mean, image_std: per-channel normalisation.
        patch_size, temporal_patch_size, merge_size: Qwen2-VL vision patching.
        use_norm: return normalised vq/mq/ta (True, the reference default) or raw ones.
        source: where the checkpoint came from (errors, reports).
    """

    special_token_ids: tuple[int, int, int]
    video_token: str
    video_token_id: int
    chat_template: str
    prompt_template: str
    stats: dict[str, tuple[float, float]] | None
    fps: float
    num_frames: int | None
    video_fps: float
    min_frame_pixels: int
    max_frame_pixels: int
    processor_min_pixels: int
    processor_max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    use_norm: bool = True
    source: str = ""


class VideoReward(RewardModel):
    """VideoReward on a Qwen2-VL backbone; scores videos [B, T, 3, H, W] in [0, 1] against prompts.

    Args:
        backbone: ``transformers.Qwen2VLModel`` (vision tower + language model, no LM head).
        head: ``nn.Linear(hidden, 3 or 1, bias=False)``, the checkpoint's ``rm_head``.
        tokenizer: the tokenizer holding the three reward tokens.
        spec: preprocessing, prompt and normalisation settings.
        batch_size: input frames per forward pass (videos per pass = batch_size // T).
    """

    name = "videoreward"
    dimensions = DIMENSIONS
    differentiable = True
    media_kind = "video"
    normalisation = None  # scores are normalised inside with the checkpoint's statistics

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Linear,
        tokenizer: Any,
        spec: VideoRewardSpec,
        *,
        batch_size: int = 128,
    ) -> None:
        super().__init__(batch_size=batch_size)
        if head.out_features not in (1, 3) or head.bias is not None:
            raise ValueError(f"videoreward: rm_head must be Linear(hidden, 1 or 3, bias=False), got {head}")
        self.backbone = backbone.requires_grad_(False)
        self.head = head.requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec

    def score(
        self,
        media: Tensor,
        prompts: Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        differentiable: bool = False,
    ) -> dict[str, Tensor]:
        """See :meth:`RewardModel.score`; videos need at least 2 frames (images are refused)."""
        if isinstance(media, Tensor) and media.ndim == 5 and media.shape[1] < FRAME_FACTOR:
            raise RewardInputError(
                f"{self.name}: videos have {media.shape[1]} frame(s), shape {tuple(media.shape)}; "
                f"VideoReward needs at least {FRAME_FACTOR}"
            )
        return super().score(media, prompts, batch_size=batch_size, differentiable=differentiable)

    # ---------------------------------------------------------------------------------- inputs
    def preprocess(self, videos: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """Sample, resize and patchify videos [N, T, 3, H, W] in [0, 1] on the model's device.

        Returns:
            ``pixel_values_videos`` [N * gt * gh * gw, 3 * tp * p * p] (float32, normalised) and
            the grid (gt, gh, gw) in patches, the same for every video.
        """
        s = self.spec
        n, t, _, h, w = videos.shape
        idx = sample_frame_indices(t, video_fps=s.video_fps, fps=s.fps, target_frames=s.num_frames)
        frames = videos[:, idx].to(device=self.device, dtype=torch.float32)  # [N, n, 3, H, W]
        factor = s.patch_size * s.merge_size
        size1 = smart_resize(
            h, w, factor=factor, min_pixels=s.min_frame_pixels, max_pixels=s.max_frame_pixels
        )
        flat = resize_frames(frames.flatten(0, 1), size1)  # [N * n, 3, h1, w1]
        # the processor's own bounds; they change the size only if max_frame_pixels exceeds them
        size2 = smart_resize(
            *size1, factor=factor, min_pixels=s.processor_min_pixels, max_pixels=s.processor_max_pixels
        )
        if size2 != size1:
            flat = resize_frames(flat, size2)
        mean = torch.tensor(s.image_mean, device=flat.device).view(1, 3, 1, 1)  # float32 at any model dtype
        std = torch.tensor(s.image_std, device=flat.device).view(1, 3, 1, 1)
        flat = (flat - mean) / std
        frames = flat.reshape(n, len(idx), 3, *size2)
        if pad := -len(idx) % s.temporal_patch_size:  # repeat the last frame, as the processor does
            frames = torch.cat([frames, frames[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        patches = patchify(
            frames,
            patch_size=s.patch_size,
            temporal_patch_size=s.temporal_patch_size,
            merge_size=s.merge_size,
        )
        grid = (frames.shape[1] // s.temporal_patch_size, size2[0] // s.patch_size, size2[1] // s.patch_size)
        return patches.flatten(0, 1), grid

    def chat_text(self, prompt: str) -> str:
        """The chat-formatted text for one video (one video placeholder, not yet expanded)."""
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "video"},
                    {"type": "text", "text": build_prompt(prompt, self.spec.prompt_template)},
                ],
            }
        ]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=self.spec.chat_template
        )

    def tokenize(self, prompts: Sequence[str], num_video_tokens: int) -> tuple[Tensor, Tensor]:
        """``input_ids`` and ``attention_mask`` [N, L] (right padding), the video placeholder expanded."""
        token = self.spec.video_token
        texts = []
        for i, prompt in enumerate(prompts):
            text = self.chat_text(prompt)
            if text.count(token) != 1:
                raise RewardInputError(
                    f"{self.name}: prompts[{i}] gives {text.count(token)} video placeholders {token!r}; "
                    "expected exactly 1 (does the prompt contain it?)"
                )
            texts.append(text.replace(token, token * num_video_tokens))
        enc = self.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def position_ids(self, input_ids: Tensor, attention_mask: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """M-RoPE positions [3, N, L] (temporal, height, width) as in the reference's transformers.

        Text before the video counts 0, 1, ...; the video block at offset s gets (s + t, s + h, s + w)
        on the merged grid; the text after it continues from s + max(gt, gh / m, gw / m). Padding
        positions are 1.
        """
        gt, gh, gw = grid
        ht, wt = gh // self.spec.merge_size, gw // self.spec.merge_size
        num_video = gt * ht * wt
        is_video = input_ids == self.spec.video_token_id
        start = is_video.int().argmax(dim=1, keepdim=True)  # [N, 1]
        j = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # [1, L]
        rel = j - start
        in_video = (rel >= 0) & (rel < num_video)
        if not torch.equal(in_video, is_video):
            raise RewardInputError(
                f"{self.name}: each sequence needs one contiguous block of {num_video} video tokens, "
                f"got counts {is_video.sum(dim=1).tolist()}"
            )
        text = torch.where(rel < 0, j, j - num_video + max(gt, ht, wt))
        t_idx, h_idx, w_idx = rel // (ht * wt), (rel // wt) % ht, rel % wt
        axes = [torch.where(in_video, start + a, text) for a in (t_idx, h_idx, w_idx)]
        return torch.stack(axes).masked_fill(attention_mask.unsqueeze(0) == 0, 1)  # [3, N, L]

    def special_positions(self, input_ids: Tensor) -> Tensor:
        """Position [N, 3] of each reward token per sequence (VQ, MQ, TA).

        Raises:
            RewardInputError: a token occurs other than exactly once in some sequence.
        """
        cols = []
        for token, token_id in zip(SPECIAL_TOKENS, self.spec.special_token_ids, strict=True):
            hits = input_ids == token_id
            counts = hits.sum(dim=1)
            if not bool((counts == 1).all()):
                raise RewardInputError(
                    f"{self.name}: {token} must occur exactly once per sequence, got counts {counts.tolist()} "
                    "(does a prompt contain it?)"
                )
            cols.append(hits.int().argmax(dim=1))
        return torch.stack(cols, dim=1)

    def prepare_inputs(self, videos: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """All backbone inputs for videos [N, T, 3, H, W] and N prompts (plus ``special_positions``)."""
        pixels, grid = self.preprocess(videos)
        num_video_tokens = grid[0] * grid[1] * grid[2] // self.spec.merge_size**2
        input_ids, attention_mask = self.tokenize(prompts, num_video_tokens)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": self.position_ids(input_ids, attention_mask, grid),
            "pixel_values_videos": pixels.to(self.dtype),
            "video_grid_thw": torch.tensor([grid] * videos.shape[0], device=self.device),
            "special_positions": self.special_positions(input_ids),
        }

    # ---------------------------------------------------------------------------------- scoring
    def pool(self, hidden: Tensor, positions: Tensor) -> Tensor:
        """Raw rewards [N, 3] from last hidden states [N, L, D] at the reward-token positions [N, 3]."""
        rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
        at_tokens = hidden[rows, positions.to(hidden.device)].float()  # [N, 3, D]
        logits = F.linear(at_tokens, self.head.weight.float())  # [N, 3, K]
        return logits.diagonal(dim1=1, dim2=2) if logits.shape[-1] == 3 else logits[..., 0]

    def raw_rewards(self, videos: Tensor, prompts: Sequence[str]) -> Tensor:
        """Unnormalised rewards [N, 3] (VQ, MQ, TA) in float32."""
        inputs = self.prepare_inputs(videos, prompts)
        positions = inputs.pop("special_positions")
        out = self.backbone(**inputs, use_cache=False)
        return self.pool(out.last_hidden_state, positions)

    def _score_videos(self, videos: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        assert prompts is not None
        raw = self.raw_rewards(videos, prompts)  # [N, 3]
        out: dict[str, Tensor] = {}
        for k, dim in enumerate(DIMENSIONS):
            out[f"{dim}_raw"] = raw[:, k]
            value = raw[:, k]
            if self.spec.use_norm and self.spec.stats is not None:
                mean, std = self.spec.stats[dim]
                value = (value - mean) / std
            out[dim] = value
        out["overall"] = out["vq"] + out["mq"] + out["ta"]
        return out


# ------------------------------------------------------------------------------------------ loading


def load_videoreward(
    path: str | Path = DEFAULT_REPO,
    *,
    base_model: str | Path | None = None,
    checkpoint_step: int | None = None,
    video_fps: float = 8.0,
    num_frames: int | None = None,
    min_frame_pixels: int = VIDEO_MIN_PIXELS,
    max_frame_pixels: int | None = None,
    use_norm: bool = True,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 128,
    template: str | Path | None = None,
) -> VideoReward:
    """Load VideoReward from a folder in the published layout or a hub id (see the module docstring).

    Args:
        path: the folder holding model_config.json and checkpoint-<step>/, or a hub id.
        base_model: Qwen2-VL folder or hub id for config.json and preprocessor_config.json (and the
            weights, for the adapter layout); default model_config.json's ``model_name_or_path``.
        checkpoint_step: which checkpoint-<step>; default the highest.
        video_fps: frames per second of the media tensors given to :meth:`VideoReward.score`
            (flowalign writes videos at 8 fps by default; Wan2.1 generates 16 fps).
        num_frames: sample this many frames instead of data_config's fps (or data_config.num_frames).
        min_frame_pixels: lower bound of h * w per frame (qwen-vl-utils' 128 * 28 * 28).
        max_frame_pixels: upper bound; default data_config.max_frame_pixels (448 * 448).
        use_norm: normalise vq/mq/ta with inference_config (the reference default).
        attn_implementation: transformers attention backend ("sdpa", "eager", "flash_attention_2").
        device, dtype: where and in what precision the model runs (the release is bfloat16).
        batch_size: input frames per forward pass.
        template: the prompt template file; default ``prompt_template.txt`` next to model_config.json.
            A text whose sha256 is not the published template's loads with a warning.

    Raises:
        FileNotFoundError: a missing folder or file (named; for the template, where to put it).
        ValueError: a config, template or weights file that does not fit (naming the file and key).
    """
    from accelerate import init_empty_weights
    from transformers import Qwen2VLConfig, Qwen2VLModel

    root = resolve_folder(
        path, patterns=["*.json", "checkpoint-*", "prompt_template.txt"], what="reward checkpoint"
    )
    config = read_model_config(root / "model_config.json")
    prompt_template = read_template(find_template(root, template))
    files = find_checkpoint(root, checkpoint_step)
    patterns = ["*.json", "*.jinja", "*.txt"] + (["*.safetensors"] if files.needs_base_weights else [])
    base = resolve_folder(base_model or config.base_model, patterns=patterns, what="base model")
    tokenizer, tokenizer_source = load_tokenizer(files.folder, base)
    state = load_state(files, lora_scaling=config.lora_scaling, base=base, vocab_size=len(tokenizer))

    qwen_config = Qwen2VLConfig.from_pretrained(base)
    qwen_config._attn_implementation = attn_implementation
    if EMBED_KEY in state:
        qwen_config.text_config.vocab_size = state[EMBED_KEY].shape[0]  # resized for the added tokens
    video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
    (video_token_id,) = single_token_ids(tokenizer, [video_token], tokenizer_source)
    if video_token_id != qwen_config.video_token_id:
        raise ValueError(
            f"videoreward: {video_token!r} is id {video_token_id} in {tokenizer_source} but "
            f"video_token_id is {qwen_config.video_token_id} in {base / 'config.json'}"
        )
    vision = qwen_config.vision_config
    spec = VideoRewardSpec(
        special_token_ids=tuple(single_token_ids(tokenizer, SPECIAL_TOKENS, tokenizer_source)),
        video_token=video_token,
        video_token_id=video_token_id,
        chat_template=chat_template_of(tokenizer, base, tokenizer_source),
        prompt_template=prompt_template,
        stats=config.stats,
        fps=config.fps,
        num_frames=num_frames if num_frames is not None else config.num_frames,
        video_fps=float(video_fps),
        min_frame_pixels=int(min_frame_pixels),
        max_frame_pixels=int(max_frame_pixels or config.max_frame_pixels),
        patch_size=int(vision.patch_size),
        temporal_patch_size=int(vision.temporal_patch_size),
        merge_size=int(vision.spatial_merge_size),
        use_norm=use_norm,
        source=str(files.folder),
        **processor_settings(base, vision),
    )
    head_weight = state[HEAD_KEY]
    if head_weight.shape[0] != config.output_dim:
        raise ValueError(
            f"videoreward: rm_head.weight in {files.folder} has {head_weight.shape[0]} rows but "
            f"model_config.output_dim is {config.output_dim}"
        )
    with init_empty_weights():  # parameters on "meta"; the checkpoint's tensors are assigned below
        backbone = Qwen2VLModel(qwen_config)
        head = nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False)
        reward = VideoReward(backbone, head, tokenizer, spec, batch_size=batch_size)
    own = reward.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"videoreward: weights in {files.folder} do not fit Qwen2-VL from {base}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {shapes[:5]} "
            f"({len(missing)}/{len(unexpected)}/{len(shapes)} in all)"
        )
    reward.load_state_dict(state, strict=True, assign=True)
    return reward.to(device=device, dtype=dtype).eval()
