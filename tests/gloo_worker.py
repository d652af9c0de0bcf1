"""Shared by the scripts that ``accelerate launch`` runs in the multi-process tests (CPU, gloo)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def toy_pairs(n: int = 8) -> list[dict]:
    """``n`` preference pairs of random 32x32 images over two prompts, the same in every process."""
    g = torch.Generator().manual_seed(0)
    media = torch.rand(2 * n, 3, 32, 32, generator=g)
    prompts = ["a small red circle in the center", "a large blue square in the top left"]
    return [
        {"media_w": media[i], "media_l": media[n + i], "prompt": prompts[i % 2], "index": i} for i in range(n)
    ]


def end_run(done_line: str) -> None:
    """Print ``done_line`` on rank 0, then leave through ``os._exit`` after a barrier: gloo can crash at
    interpreter exit after all work is done, so the tests judge by the printed markers."""
    if dist.get_rank() == 0:
        print(done_line, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
