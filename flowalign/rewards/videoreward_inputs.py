"""VideoReward's inputs: the prompt template and the reference's video preprocessing rules, on tensors.

Pure functions shared by :mod:`flowalign.rewards.videoreward`.

The prompt template (VideoAlign's "detailed_special" text, the instructions the checkpoint was trained
on) is not shipped with flowalign, which carries no text from other repositories: it is read at load
time from ``prompt_template.txt`` in the checkpoint folder or from a path the user gives
(:func:`find_template`, :func:`read_template`). Only its sha256 is kept here
(:data:`PUBLISHED_TEMPLATE_SHA256`), to warn when a supplied text differs, since any change in the
instructions changes the scores. A template must hold ``{text_prompt}`` once and the reward tokens
once each, in the order VQ, MQ, TA (:func:`validate_template`).

The video steps reproduce VideoAlign's ``vision_process.py`` (qwen-vl-utils) and Qwen2-VL's processor:

- :func:`sample_frame_indices`: n = T / video_fps * fps clamped to [4, min(768, T)], rounded to an even
  count with Python's round (half to even), at most T; indices ``linspace(0, T - 1, n).round()``.
- :func:`smart_resize`: the frame size, multiples of 28 within [min_pixels, max_pixels], aspect kept.
- :func:`resize_frames`: bicubic antialiased resize rounded to uint8 levels, as torchvision resizes a
  uint8 frame (measured: identical but for about 1e-5 of the pixels, one level off at .5 ties).
- :func:`patchify`: Qwen2-VL's flat patch layout.
"""

from __future__ import annotations

import hashlib
import math
import string
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from flowalign.rewards.base import RewardInputError

__all__ = [
    "PUBLISHED_TEMPLATE_SHA256",
    "SPECIAL_TOKENS",
    "TEMPLATE_FILE",
    "build_prompt",
    "find_template",
    "patchify",
    "read_template",
    "resize_frames",
    "sample_frame_indices",
    "smart_resize",
    "validate_template",
]

SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DIMENSIONS = ("vq", "mq", "ta")
VIDEO_MIN_PIXELS = 128 * 28 * 28  # qwen-vl-utils' per-frame lower bound for videos
MIN_FRAMES, MAX_FRAMES, FRAME_FACTOR = 4, 768, 2

TEMPLATE_FILE = "prompt_template.txt"  # looked for next to model_config.json
# sha256 of the UTF-8 bytes of VideoAlign's "detailed_special" template, the text the checkpoint was
# trained on; a template with another digest still loads, with a warning.
PUBLISHED_TEMPLATE_SHA256 = "fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700"
TEMPLATE_HINT = "train/prompt_template.py in KwaiVGI/VideoAlign"
_WARNED: set[tuple[str, str]] = set()  # (file, digest) pairs already warned about


def validate_template(text: str, source: str | Path) -> None:
    """Check a prompt template: one ``{text_prompt}`` field, no other, and each reward token once.

    The tokens must come in the order VQ, MQ, TA, which is the order of the head's outputs.

    Raises:
        ValueError: naming ``source`` and what is wrong.
    """
    try:
        fields = [
            (name, spec, conv) for _, name, spec, conv in string.Formatter().parse(text) if name is not None
        ]
    except ValueError as err:
        raise ValueError(f"{source}: prompt template is not a str.format template: {err}") from None
    if fields != [("text_prompt", "", None)]:
        found = [
            f"{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
            for name, spec, conv in fields
        ]
        raise ValueError(
            f"{source}: prompt template must hold {{text_prompt}} exactly once and no other field, "
            f"found {found} (write literal braces as {{{{ and }}}})"
        )
    counts = {token: text.count(token) for token in SPECIAL_TOKENS}
    if any(count != 1 for count in counts.values()):
        raise ValueError(f"{source}: each reward token must occur exactly once in the template, got {counts}")
    positions = [text.index(token) for token in SPECIAL_TOKENS]
    if positions != sorted(positions):
        order = sorted(SPECIAL_TOKENS, key=text.index)
        raise ValueError(
            f"{source}: reward tokens must come in the order {list(SPECIAL_TOKENS)}, got {order}"
        )


def read_template(path: str | Path) -> str:
    """Read and validate a prompt template file (UTF-8, bytes kept as they are: no newline translation).

    Warns (once per file and content) when the file's sha256 is not :data:`PUBLISHED_TEMPLATE_SHA256`.

    Raises:
        FileNotFoundError: no such file. ValueError: see :func:`validate_template`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"videoreward: prompt template {path} not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: prompt template is not UTF-8 text: {err}") from None
    validate_template(text, path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != PUBLISHED_TEMPLATE_SHA256 and (str(path.resolve()), digest) not in _WARNED:
        _WARNED.add((str(path.resolve()), digest))
        warnings.warn(
            f"videoreward: prompt template {path} differs from the published 'detailed_special' text "
            f"(sha256 {digest[:12]}..., expected {PUBLISHED_TEMPLATE_SHA256[:12]}...); scores will not "
            "match the published checkpoint",
            UserWarning,
            stacklevel=2,
        )
    return text


def find_template(folder: Path, template: str | Path | None = None) -> Path:
    """The template file: ``template`` if given, else ``folder / prompt_template.txt``.

    Raises:
        FileNotFoundError: no ``template`` and no file in ``folder``; the message says where to put it.
    """
    if template is not None:
        return Path(template).expanduser()
    path = folder / TEMPLATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"videoreward: no prompt template at {path}; save VideoAlign's 'detailed_special' template "
            f"({TEMPLATE_HINT}) as {path} or pass template=PATH"
        )
    return path


def build_prompt(prompt: str, template: str) -> str:
    """The user-turn text for one video: ``template`` with ``{text_prompt}`` replaced by ``prompt``.

    ``str.format`` as the reference does (``{{``/``}}`` become single braces; braces inside ``prompt``
    are kept as they are).
    """
    return template.format(text_prompt=prompt)


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
