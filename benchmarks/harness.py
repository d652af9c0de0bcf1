"""Tiny timing harness shared by the benchmarks: warm-up, repeats, median, side-by-side ratio."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Timing:
    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_fn(name: str, fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, sync=None) -> Timing:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls (``sync`` e.g. cuda.synchronize)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        seconds.append(time.perf_counter() - start)
    return Timing(name, seconds)


def mean_step_seconds(step: Callable[[int], object], *, warmup: int, steps: int) -> float:
    """Mean wall seconds of ``step(k)`` over ``steps`` calls after ``warmup`` untimed ones; ``k`` counts
    every call from 0, so each call can take its own batch."""
    for k in range(warmup):
        step(k)
    start = time.perf_counter()
    for k in range(steps):
        step(warmup + k)
    return (time.perf_counter() - start) / steps


def interleaved(
    fns: dict[str, Callable[[], object]], *, repeats: int = 5, warmup: int = 1, sync=None
) -> dict:
    """Time several functions alternately (A B A B ...) so drift in machine load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {name: Timing(name, []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if sync:
                sync()
            start = time.perf_counter()
            fn()
            if sync:
                sync()
            out[name].seconds.append(time.perf_counter() - start)
    return out


def report(baseline: Timing, ours: Timing, *, unit: str = "s") -> str:
    """One table: both medians and the speed-up of ours over the baseline (> 1 means ours is faster)."""
    ratio = baseline.median / ours.median
    lines = [
        f"{'run':<28} {'median ' + unit:>12} {'min':>10} {'max':>10}",
        *(
            f"{t.name:<28} {t.median:>12.4f} {min(t.seconds):>10.4f} {max(t.seconds):>10.4f}"
            for t in (baseline, ours)
        ),
        f"speed-up (baseline / ours): {ratio:.3f}x",
    ]
    return "\n".join(lines)


def run_in_subprocess(script: str, variant: str, *, threads: int | None = None) -> dict:
    """Run ``script`` again with this command line plus ``--variant VARIANT`` in a fresh process (so each
    variant's peak memory and thread pool are its own) and return the JSON its last output line holds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, script, *sys.argv[1:], "--variant", variant]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
