"""Work split across processes (``accelerate launch``, ``torchrun``, SLURM) and the files each one writes.

Sampling and scoring are split by item: item ``i`` of a run belongs to one process, chosen by
:meth:`Shard.owns`. Every process appends its finished rows to its own part file next to the output
(``manifest.jsonl`` -> ``manifest.rank1.jsonl``), holding that part's lock while it writes. After a
barrier the main process merges the parts into the one output file (an atomic rename) and removes them.
If a process dies, its part stays on disk: the next run counts its rows as done and merges it. So
a killed run loses nothing finished and redoes nothing finished, whatever the next run's process count.

Locks (``flowalign.files.exclusive_lock``): the output's own lock guards reading and merging; each
part has its lock, held by its writer for the whole run. A merge takes the output lock and then tries
each part's lock without waiting, skipping a part another process is still writing; a writer takes its
part lock first and the output lock only briefly to read. Neither order waits on the other, so two runs
sharing a folder cannot deadlock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowalign.files import exclusive_lock, match_umask

__all__ = [
    "OtherProcessFailed",
    "Shard",
    "current_shard",
    "local_device",
    "merge_parts",
    "part_path",
    "part_paths",
    "read_rows",
    "repair_tail",
    "try_lock",
]


class OtherProcessFailed(ValueError):
    """Another process of a multi-process run failed; raised on this one so all stop at the same point.

    A ValueError so that commands report it as one ``error:`` line, like the failing process's own error.
    """


@dataclass(frozen=True)
class Shard:
    """This process's place in the run: ``rank`` of ``world_size`` (1 process: rank 0 of 1).

    ``block`` is the number of consecutive items that go to one process together: the batch size of
    the one-process run, so every process samples exactly the batches a one-process run samples (same
    shapes, same kernels: byte-equal files even where a kernel's result depends on the batch shape).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def owns(self, index: int, block: int = 1) -> bool:
        """Whether item ``index`` is this process's: block ``index // block`` goes to rank block mod N."""
        return (index // max(block, 1)) % self.world_size == self.rank

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for in a one-process run)."""
        if self.sharded:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every process, in rank order (``[value]`` in a one-process run)."""
        if not self.sharded:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def first_error(self, error: BaseException | None) -> str | None:
        """Share each process's error (or None); the first one as ``"process r of N: ..."`` on every
        process, or None when all succeeded (a one-process run: its own error, if any)."""
        messages = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        for rank, message in enumerate(messages):
            if message is not None:
                return f"process {rank} of {self.world_size} failed: {message}" if self.sharded else message
        return None


def current_shard() -> Shard:
    """The process's shard, from the launcher's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``).

    With more than one process, the process group is set up by ``accelerate.PartialState`` (gloo on
    CPU, NCCL on GPUs) if nobody has done it yet.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Shard()
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState()
    return Shard(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0))


def local_device(device: str) -> str:
    """``"cuda"`` -> ``"cuda:<LOCAL_RANK>"`` when several processes share a node (one GPU each; with
    fewer GPUs than processes, ``LOCAL_RANK`` modulo the GPU count). Anything else is returned as given."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if device != "cuda" or world <= 1:
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0) % count}" if count else device


def part_path(path: str | os.PathLike[str], rank: int) -> Path:
    """The part file of process ``rank`` for output ``path``: ``scores.jsonl`` -> ``scores.rank1.jsonl``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def part_paths(path: str | os.PathLike[str]) -> list[Path]:
    """Every part file of ``path`` on disk (any process count), in rank order."""
    path = Path(path)
    pattern = re.compile(re.escape(path.stem) + r"\.rank(\d+)" + re.escape(path.suffix) + "$")
    found = [
        (int(m[1]), p)
        for p in path.parent.glob(f"{path.stem}.rank*{path.suffix}")
        if (m := pattern.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The lock guarding ``path`` (a hidden file beside it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def try_lock(path: str | os.PathLike[str]) -> Iterator[bool]:
    """Take the exclusive lock on ``path`` if it is free (yields True), else yield False at once."""
    path = Path(path)
    with open(path, "a") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield True
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def repair_tail(path: Path) -> None:
    """Make appending safe after an interrupted write: a last line without its newline is completed when
    it is a whole JSON row, else (a row cut short) removed."""
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:])
    except ValueError:
        with path.open("r+b") as fh:
            fh.truncate(start)
    else:
        with path.open("ab") as fh:
            fh.write(b"\n")


def read_rows(path: Path) -> list[dict]:
    """The complete JSON rows of a jsonl file (missing: none). A last line cut short by a kill, or still
    being written by another process, is skipped; any other bad line raises ValueError naming it."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not valid JSON: {err}") from None
        if not isinstance(row, dict) or "id" not in row:
            raise ValueError(f"{path}: line {number} is not a row with an 'id'")
        rows.append(row)
    return rows


def merge_parts(path: str | os.PathLike[str], order: Callable[[dict], Any] | None = None) -> int:
    """Merge every part file of ``path`` that no process is writing into ``path``; return rows added.

    Each id is kept once (a row of ``path`` before a part's), and all rows are sorted by ``order(row)``
    (default: the id; the sort is stable), the order a one-process run writes. ``path`` is replaced by an atomic rename
    and only then are the merged parts removed, so a kill at any point loses no row (a part merged but
    not yet removed is merged again as nothing new). Call it holding ``path``'s lock.
    """
    path = Path(path)
    added = 0
    with contextlib.ExitStack() as stack:
        parts = [p for p in part_paths(path) if stack.enter_context(try_lock(lock_path(p)))]
        if not parts:
            return 0
        repair_tail(path)
        rows = read_rows(path)
        seen = {str(r["id"]) for r in rows}
        new: dict[str, dict] = {}
        for part in parts:
            for row in read_rows(part):
                if str(row["id"]) not in seen:
                    new.setdefault(str(row["id"]), row)
        merged = sorted(rows + list(new.values()), key=order or (lambda r: r["id"]))
        added = len(new)
        if added:
            tmp = path.with_name(f".{path.name}.merge-{os.getpid()}.tmp")
            with open(tmp, "w") as sink:
                sink.writelines(json.dumps(r) + "\n" for r in merged)
                sink.flush()
                os.fsync(sink.fileno())
            match_umask(tmp)
            os.replace(tmp, path)
        for part in parts:
            part.unlink(missing_ok=True)
    return added


def done_rows(path: Path) -> list[dict]:
    """Rows of ``path`` and of all its parts on disk, each id once (``path`` first). Hold ``path``'s
    lock while calling it: a merge then cannot move rows between the files being read."""
    rows, seen = [], set()
    for source in [path, *part_paths(path)]:
        for row in read_rows(source):
            if str(row["id"]) not in seen:
                seen.add(str(row["id"]))
                rows.append(row)
    return rows


@contextlib.contextmanager
def writing_part(path: Path, shard: Shard) -> Iterator[Path]:
    """Hold this process's part lock for the block and yield the part's path (tail repaired)."""
    part = part_path(path, shard.rank)
    with exclusive_lock(lock_path(part)):
        repair_tail(part)
        yield part


def finish(
    path: Path,
    shard: Shard,
    lock: Path,
    order: Callable[[dict], Any] | None = None,
    *,
    error: BaseException | None = None,
    then: Callable[[], None] | None = None,
) -> None:
    """End a sharded write on every process: share errors, wait for all, merge the parts into ``path`` on
    the main process (under ``lock``), wait again so every process returns with the merged file in place,
    then raise a failure of any process on all of them (its finished rows are merged first). ``then``
    runs on the main process after the merge, still under ``lock`` (e.g. to convert the merged file).

    Every process must call it once per write, failed or not (it holds collective steps).
    """
    message = shard.first_error(error) if shard.sharded else None
    shard.barrier()
    if shard.is_main:
        with exclusive_lock(lock):
            merge_parts(path, order)
            try:
                if then is not None and message is None:
                    then()
            except Exception as err:  # noqa: BLE001 - raised after the barrier, not before it
                error = error or err
    shard.barrier()
    if error is not None:
        raise error
    if message is not None:
        raise OtherProcessFailed(message)
