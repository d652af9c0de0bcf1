"""Checks of the commands' numeric options, run before any model is loaded or sample made.

Every number goes through :func:`flowalign.validation.check_number`: finite (NaN and +-inf refused),
within the range below, whole where it counts something; the message names the option. Sizes are
checked twice: before loading, against the memory the decoded media alone would take, and after
loading, against the family's size rule (multiples of its VAE and patch factors) and the lower bound of
:mod:`flowalign.pipelines.memory_guard` with the model's own VAE.
"""

from __future__ import annotations

from typing import Any

from flowalign.cli.app import number
from flowalign.validation import check_number, short_repr

MAX_STEPS = 10_000
MAX_SIDE = 65_536  # pixels per side
MAX_FRAMES = 100_000
MAX_COUNT = 100_000  # samples per prompt, candidates, repetitions
MAX_BATCH = 4_096
MAX_SCALE = 1_000.0  # guidance scales and strengths
MAX_SEED = 2**63 - 1


def check_steps(steps: int | None, option: str = "--steps") -> None:
    number(steps, option, lo=1, hi=MAX_STEPS, integer=True)


def check_scale(value: float | None, option: str, lo: float = 0.0) -> None:
    number(value, option, lo=lo, hi=MAX_SCALE)


def check_size_options(height: int | None, width: int | None, num_frames: int | None) -> None:
    number(height, "--height", lo=1, hi=MAX_SIDE, integer=True)
    number(width, "--width", lo=1, hi=MAX_SIDE, integer=True)
    number(num_frames, "--num-frames", lo=1, hi=MAX_FRAMES, integer=True)


def check_seed(seed: int | None, option: str = "--seed") -> None:
    number(seed, option, lo=0, hi=MAX_SEED, integer=True)


def check_count(value: int | None, option: str, lo: int = 1, hi: int = MAX_COUNT) -> None:
    number(value, option, lo=lo, hi=hi, integer=True)


def parse_step_range(text: str | None) -> tuple[float, float] | None:
    """``--guide-steps a:b`` -> (a, b) with 0 <= a <= b <= 1, or ValueError naming the option."""
    if not text:
        return None
    parts = text.split(":")
    try:
        a, b = (float(x) for x in parts)
    except ValueError:
        raise ValueError(f"--guide-steps must look like 0.2:0.9, got {short_repr(text)}") from None
    check_number(a, "--guide-steps start", lo=0.0, hi=1.0)
    check_number(b, "--guide-steps end", lo=a, hi=1.0)
    return a, b


def check_generation_options(
    *,
    steps: int | None,
    guidance_scale: float | None,
    true_cfg_scale: float,
    seed: int,
    height: int | None,
    width: int | None,
    num_frames: int | None,
    samples_per_prompt: int,
    batch_size: int,
    fps: int,
    guidance_strength: float,
    guide_steps: str | None,
) -> tuple[float, float] | None:
    """Every numeric option of ``generate``; returns the parsed ``--guide-steps`` range."""
    check_steps(steps)
    check_scale(guidance_scale, "--guidance-scale")
    check_scale(true_cfg_scale, "--true-cfg-scale")
    check_seed(seed)
    check_size_options(height, width, num_frames)
    check_count(samples_per_prompt, "--samples-per-prompt")
    check_count(batch_size, "--batch-size", hi=MAX_BATCH)
    check_count(fps, "--fps", hi=1_000)
    check_scale(guidance_strength, "--guidance-strength")
    return parse_step_range(guide_steps)


def check_size_before_loading(
    height: int | None, width: int | None, num_frames: int | None, batch: int, device: str
) -> None:
    """Refuse a size whose decoded media alone cannot fit (only the sizes given; defaults come later)."""
    from flowalign.pipelines.memory_guard import check_media_fits

    if height or width:
        check_media_fits(height or 1, width or 1, num_frames or 1, batch, device)


def check_size_for_model(
    model: Any, height: int | None, width: int | None, num_frames: int | None, batch: int, device: str
) -> tuple[int, int, int]:
    """The size the model will sample (its defaults filling the gaps), checked against its rule and memory."""
    from flowalign.pipelines.memory_guard import check_media_fits

    size = (
        height or model.default_height,
        width or model.default_width,
        num_frames or model.default_num_frames,
    )
    model.check_size(*size)
    check_media_fits(*size, batch, device, model=model)
    return size
