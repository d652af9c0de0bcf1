"""Media for scoring: files read ahead in a background thread and grouped into batches of one shape.

Items are anything with a ``file`` attribute (``flowalign.rewards.scoring.MediaItem``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

__all__ = ["batches", "prefetch"]


def prefetch(items: Sequence[Any], *, max_frames: int | None, depth: int) -> Iterator[tuple[Any, Tensor]]:
    """Load media in a background thread, ``depth`` files ahead, in order."""
    from flowalign.data.media import load_media

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque[tuple[Any, Future]] = deque()
        it = iter(items)
        for item in it:
            pending.append((item, pool.submit(load_media, item.file, max_frames=max_frames)))
            if len(pending) >= depth:
                break
        while pending:
            item, future = pending.popleft()
            tensor = future.result()  # MediaError names the file
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load_media, nxt.file, max_frames=max_frames)))
            yield item, tensor


def batches(loaded: Iterator[tuple[Any, Tensor]], batch_size: int) -> Iterator[tuple[list[Any], Tensor]]:
    """Group consecutive items of one shape into stacked batches of at most ``batch_size``.

    If reading the next file fails, the batch gathered so far is yielded before the error is
    raised, so every item before the bad file is scored and written.
    """
    items: list[Any] = []
    tensors: list[Tensor] = []
    while True:
        try:
            item, tensor = next(loaded)
        except StopIteration:
            break
        except Exception:
            if tensors:
                yield items, torch.stack(tensors)
            raise
        if tensors and tensor.shape != tensors[0].shape:
            yield items, torch.stack(tensors)
            items, tensors = [], []
        items.append(item)
        tensors.append(tensor)
        if len(tensors) == batch_size:
            yield items, torch.stack(tensors)
            items, tensors = [], []
    if tensors:
        yield items, torch.stack(tensors)
