"""Refuse a media size whose samples cannot be held in memory, before anything is allocated.

The estimate is a lower bound on what sampling at that size must hold at once, so a refusal is certain
and never a guess::

    bytes >= batch * frames * H * W * 3 * 4                  the decoded media, in fp32
           + H * W * C0 * b                                   one frame's full-resolution VAE activation:
                                                              C0 channels in the VAE's dtype (a video VAE
                                                              may decode a few frames at a time)

``C0`` is the VAE decoder's channel count at full resolution (``block_out_channels[0]`` of diffusers'
``AutoencoderKL``, ``base_dim`` of Wan's VAE; 0 when unknown or for models without a VAE). The
available memory is the host's ``MemAvailable`` (bounded by the cgroup's limit) on the CPU and the
free device memory plus what torch's allocator holds in reserve on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["available_memory", "check_media_fits", "media_bytes"]

GIB = 1024**3


def _cgroup_room() -> int | None:
    """Bytes the cgroup (v2) may still use, or None when there is no limit or it cannot be read."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def _host_available() -> int | None:
    room = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                room = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        room = None
    if room is None:
        try:
            import os

            room = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None
    cgroup = _cgroup_room()
    return room if cgroup is None else min(room, cgroup)


def available_memory(device: str | torch.device) -> int | None:
    """Bytes that may still be allocated on ``device`` (None when it cannot be told)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type in ("cpu", "mps"):  # mps shares the host's memory
        return _host_available()
    return None


def vae_channels(model) -> tuple[int, int]:
    """(C0, bytes per value) of a model's VAE at full resolution; (0, 4) without a VAE."""
    vae = getattr(getattr(model, "pipe", None), "vae", None)
    config = getattr(vae, "config", None)
    if config is None:
        return 0, 4
    channels = getattr(config, "block_out_channels", None)
    c0 = int(channels[0]) if channels else int(getattr(config, "base_dim", 0) or 0)
    dtype = next((p.dtype for p in vae.parameters()), torch.float32)
    return c0, torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4


def media_bytes(
    height: int, width: int, num_frames: int, batch: int, *, vae: tuple[int, int] = (0, 4)
) -> int:
    """The lower bound of the module docstring for one batch of ``batch`` samples."""
    frame = int(height) * int(width)
    c0, nbytes = vae
    return batch * frame * int(num_frames) * 3 * 4 + frame * c0 * nbytes


def check_media_fits(
    height: int,
    width: int,
    num_frames: int,
    batch: int,
    device: str | torch.device,
    *,
    model=None,
    what: str = "sampling",
) -> None:
    """Raise ValueError (one line with both numbers) when the lower bound exceeds the available memory."""
    vae = vae_channels(model) if model is not None else (0, 4)
    need = media_bytes(height, width, num_frames, batch, vae=vae)
    room = available_memory(device)
    if room is not None and need > room:
        size = f"{height}x{width}" + (f"x{num_frames} frames" if num_frames > 1 else "")
        raise ValueError(
            f"{what} at {size} with batch {batch} needs at least {need / GIB:.1f} GiB but "
            f"{room / GIB:.1f} GiB is available on {device}; lower the size or the batch size"
        )
