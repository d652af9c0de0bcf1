"""VideoReward's inputs: the prompt template and the reference's video preprocessing rules, on tensors.

Pure functions shared by :mod:`flowalign.rewards.videoreward`; each reproduces a step of VideoAlign's
``vision_process.py`` (qwen-vl-utils) and Qwen2-VL's processor:

- :func:`sample_frame_indices`: n = T / video_fps * fps clamped to [4, min(768, T)], rounded to an even
  count with Python's round (half to even), at most T; indices ``linspace(0, T - 1, n).round()``.
- :func:`smart_resize`: the frame size, multiples of 28 within [min_pixels, max_pixels], aspect kept.
- :func:`resize_frames`: bicubic antialiased resize rounded to uint8 levels, as torchvision resizes a
  uint8 frame (measured: identical but for about 1e-5 of the pixels, one level off at .5 ties).
- :func:`patchify`: Qwen2-VL's flat patch layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from flowalign.rewards.base import RewardInputError

__all__ = [
    "PROMPT_TEMPLATE",
    "SPECIAL_TOKENS",
    "build_prompt",
    "patchify",
    "resize_frames",
    "sample_frame_indices",
    "smart_resize",
]

SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DIMENSIONS = ("vq", "mq", "ta")
VIDEO_MIN_PIXELS = 128 * 28 * 28  # qwen-vl-utils' per-frame lower bound for videos
MIN_FRAMES, MAX_FRAMES, FRAME_FACTOR = 4, 768, 2

# "detailed_special" template of VideoAlign's prompt_template.py (MIT licence, Kling Team, Kuaishou
# Technology), kept byte for byte (trailing spaces included): the checkpoint was trained on this text.
_TEMPLATE_LINES = (
    "",
    "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.",
    "",
    "**Visual Quality:**  ",
    "Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:",
    "- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.",
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.",
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).",
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.",
    "- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. ",
    "",
    "Please provide the ratings of Visual Quality: <|VQ_reward|>",
    "END",
    "",
    "**Motion Quality:**  ",
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:",
    "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).",
    "- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).",
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.",
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.",
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.",
    "- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.",
    "",
    "Please provide the ratings of Motion Quality: <|MQ_reward|>",
    "END",
    "",
    "**Text Alignment:**  ",
    "Assess how well the video matches the textual prompt across the following sub-dimensions:",
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.",
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.",
    "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  ",
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.",
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.",
    "",
    "Textual prompt - {text_prompt}",
    "Please provide the ratings of Text Alignment: <|TA_reward|>",
    "END",
    "",
)
PROMPT_TEMPLATE = "\n".join(_TEMPLATE_LINES)


def build_prompt(prompt: str) -> str:
    """The user-turn text for one video: the detailed_special template around ``prompt``."""
    return PROMPT_TEMPLATE.format(text_prompt=prompt)


# ------------------------------------------------------------------------------------- preprocessing
def smart_resize(
    height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen-VL's frame size: multiples of ``factor``, ``min_pixels <= h * w <= max_pixels``, aspect kept.

    h, w = round(H / f) * f, round(W / f) * f; if h * w > max_pixels: beta = sqrt(H W / max_pixels),
    h, w = floor(H / beta / f) * f, ...; if below min_pixels: beta = sqrt(min_pixels / (H W)) and ceil.
    """
    if max(height, width) / min(height, width) > 200:
        raise RewardInputError(f"videoreward: frame aspect ratio {height}x{width} exceeds 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def sample_frame_indices(
    num_frames: int, *, video_fps: float, fps: float = 2.0, target_frames: int | None = None
) -> list[int]:
    """Uniform frame indices as qwen-vl-utils' ``smart_nframes`` + ``linspace(...).round()``.

    n = num_frames / video_fps * fps, clamped to [4, floor_even(min(768, num_frames))] and rounded to
    an even count (Python's round, half to even), or ``target_frames`` rounded to even; at most
    ``num_frames``.

    Raises:
        RewardInputError: fewer than 2 frames would be used (the reference refuses such videos).
    """
    if target_frames is not None:
        n = round(target_frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        low = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        high = math.floor(min(MAX_FRAMES, num_frames) / FRAME_FACTOR) * FRAME_FACTOR
        n = min(max(num_frames / video_fps * fps, low), high)
        n = round(n / FRAME_FACTOR) * FRAME_FACTOR
    n = min(n, num_frames)
    if not FRAME_FACTOR <= n <= num_frames:
        raise RewardInputError(
            f"videoreward: a video of {num_frames} frame(s) gives {n} sampled frames; needs at least "
            f"{FRAME_FACTOR} (the reference refuses shorter videos)"
        )
    return torch.linspace(0, num_frames - 1, n).round().long().tolist()


def _to_uint8_levels(x: Tensor) -> Tensor:
    """Clamp to [0, 1] and round to k / 255, passing gradients straight through the rounding."""
    x = x.clamp(0.0, 1.0)
    return x + (torch.round(x * 255.0) / 255.0 - x).detach()


def resize_frames(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic antialiased resize of [N, 3, H, W] in [0, 1], as torchvision resizes uint8 frames."""
    if tuple(frames.shape[-2:]) != size:
        frames = F.interpolate(frames, size=size, mode="bicubic", align_corners=False, antialias=True)
    return _to_uint8_levels(frames)


def patchify(frames: Tensor, *, patch_size: int, temporal_patch_size: int, merge_size: int) -> Tensor:
    """Qwen2-VL patch layout of normalised frames [B, T, C, H, W] -> [B, gt * gh * gw, C * tp * p * p].

    Patches are ordered (t, h / m, w / m, m, m) so each merge window's m x m patches are adjacent;
    T must be a multiple of tp and H, W multiples of p * m.
    """
    b, t, c, h, w = frames.shape
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    m, p, tp = merge_size, patch_size, temporal_patch_size
    x = frames.reshape(b, gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # [B, gt, gh/m, gw/m, m, m, C, tp, p, p]
    return x.reshape(b, gt * gh * gw, c * tp * p * p)
