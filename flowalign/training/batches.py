"""Deterministic batches for the loop: one seeded order per epoch, the same for any process count.

Each epoch is a permutation of the dataset drawn from (seed, epoch). It is cut into global batches
of ``G = batch_size * grad_accum_steps * num_processes`` items (an incomplete tail is dropped);
micro-step k of process p reads positions ``[(k * P + p) * B, (k * P + p + 1) * B)`` of each.
Splitting the same global batch over more processes or micro-steps therefore changes nothing
but the summation order, and the cursor ``(epoch, position)`` is all a checkpoint needs to
continue with the exact next batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from flowalign.data.batches import PromptBatch
from flowalign.training.method import sample_seed

__all__ = ["DataCursor", "IndexedDataset", "to_device"]


class IndexedDataset(Dataset):
    """Checks that items are dicts and gives each one its dataset position as ``"index"`` if it has none.

    The index seeds the per-sample random numbers (``StepContext``), so it must be an int.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        if not isinstance(item, Mapping):
            raise TypeError(
                f"dataset item {i} is a {type(item).__name__}; training datasets must return dicts"
            )
        if "index" not in item:
            return {**item, "index": i}
        index = item["index"]
        if isinstance(index, Tensor) and index.ndim == 0 and not index.is_floating_point():
            index = int(index)
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(
                f"dataset item {i}: 'index' must be an int (it seeds per-sample noise), got {index!r}"
            )
        return dict(item)


class DataCursor:
    """This process's micro-batches of each global batch, with a resumable (epoch, position) cursor.

    Args:
        dataset: map-style dataset of dicts.
        collate: list of items -> batch.
        seed: seed of the per-epoch order.
        micro_batch: items per process per micro-step (``batch_size``).
        accum: micro-steps per optimizer step.
        num_processes, process_index: world size and rank.
        num_workers: DataLoader workers.
        epoch, position: where to start (from a checkpoint's cursor).
        pin_memory: pin host memory (CUDA).
    """

    def __init__(
        self,
        dataset: Dataset,
        collate: Callable[[list[dict]], Any],
        *,
        seed: int,
        micro_batch: int,
        accum: int = 1,
        num_processes: int = 1,
        process_index: int = 0,
        num_workers: int = 0,
        epoch: int = 0,
        position: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = IndexedDataset(dataset)
        self.collate = collate
        self.seed = seed
        self.micro_batch = micro_batch
        self.accum = accum
        self.num_processes = num_processes
        self.process_index = process_index
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.global_batch = micro_batch * accum * num_processes
        self.n = len(self.dataset)
        if self.n < self.global_batch:
            raise ValueError(
                f"dataset has {self.n} items, fewer than one global batch of {self.global_batch} "
                f"(batch_size {micro_batch} x grad_accum_steps {accum} x {num_processes} processes)"
            )
        if position < 0 or epoch < 0:
            raise ValueError(f"invalid data cursor epoch={epoch} position={position}")
        self.epoch, self.position = epoch, position
        self._iter: Iterator | None = None
        self._normalise()

    def _normalise(self) -> None:
        if self.position + self.global_batch > len(self.order(self.epoch)):  # the tail cannot fill a batch
            self.epoch, self.position, self._iter = self.epoch + 1, 0, None

    def order(self, epoch: int) -> list[int]:
        """The dataset order of ``epoch`` (independent of the process count and batch sizes).

        A dataset with ``batch_order(global_batch, seed=, epoch=)`` (bucketed media) gives its own
        order, in which each run of ``global_batch`` items shares one bucket (it may leave items out).
        """
        cached = getattr(self, "_order", None)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        batch_order = getattr(self.dataset.dataset, "batch_order", None)
        if batch_order is not None:
            order = batch_order(self.global_batch, seed=self.seed, epoch=epoch)
            if len(order) < self.global_batch:
                raise ValueError(
                    f"no bucket holds a full global batch of {self.global_batch} items; lower batch_size "
                    "or use fewer buckets"
                )
        else:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, "data", "order", 0))
            order = torch.randperm(self.n, generator=g).tolist()
        self._order = (epoch, order)
        return order

    def _open(self) -> Iterator:
        order = self.order(self.epoch)
        batches = []
        for start in range(self.position, len(order) - self.global_batch + 1, self.global_batch):
            for k in range(self.accum):
                lo = start + (k * self.num_processes + self.process_index) * self.micro_batch
                batches.append(order[lo : lo + self.micro_batch])
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # an explicit generator keeps the DataLoader from drawing on the global torch RNG
            generator=torch.Generator().manual_seed(
                sample_seed(self.seed, self.epoch, "data", "workers", self.position)
            ),
        )
        return iter(loader)

    def next_step(self) -> list[Any]:
        """This process's ``accum`` micro-batches of the next global batch; advances the cursor."""
        if self._iter is None:
            self._iter = self._open()
        micro = [next(self._iter) for _ in range(self.accum)]
        self.position += self.global_batch
        self._normalise()
        return micro

    def state(self) -> dict[str, int]:
        """The cursor (where the next global batch starts) for a checkpoint."""
        return {"epoch": self.epoch, "position": self.position, "global_batch_size": self.global_batch}


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``; other values are kept. A typed batch
    (:mod:`flowalign.data.batches`) moves itself."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, PromptBatch):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
