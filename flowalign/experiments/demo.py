"""``flowalign demo``: the toy world end to end on a fresh machine with nothing downloaded.

The default run shows alignment working on held-out prompts in about five minutes on two CPU cores: the
base model (shipped with the package), Flow-DPO on pairs of its own samples ranked by the exact oracles,
Flow-NRG guidance with a latent reward distilled from those oracles, and a one-step student distilled
from the base, all evaluated on the same held-out prompts and seeds; then the evaluation report. It
writes ``summary.md`` and ``index.html`` (one table, one labelled grid), ``summary.json`` and
``report/report.html`` under the output folder, rewriting them after every stage.

Each stage prints one line with its estimated time, completed with the time it took. The estimate
is the stage's work (transformer passes of one sample, see :func:`stage_work`) times the seconds per
pass measured on this machine by the base stage (before that: one AMD EPYC core's).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flowalign.experiments import demo_stages
from flowalign.experiments.demo_report import DemoReport

STAGES = ("base", "dpo", "nrg", "onestep")
OPTIONAL_STAGES = ("grpo",)
"""Stages run only when asked for (``stages=(..., "grpo")``)."""
AVAILABLE_STAGES = STAGES[:3] + OPTIONAL_STAGES + STAGES[3:]


@dataclass
class DemoConfig:
    """Settings of the demo; every stage evaluates ``num_samples`` held-out samples.

    The defaults are the README's alignment recipe (320 pairs, 300 Flow-DPO steps of 16 pairs) with the
    other stages cut to fit: 459 s of CPU time on one EPYC core in all (base 36 s, Flow-DPO 281 s of
    which the 1,280 pair samples take about half, Flow-NRG 79 s, one-step 51 s, report 3 s). Each
    run's summary records every stage's wall-clock and CPU time."""

    out_dir: Path = Path("runs/demo")
    stages: tuple[str, ...] = STAGES
    """Which stages to run ("base" always runs: every row is compared with it)."""
    base_steps: int = 1500
    """Flow-matching steps of the toy base model. 1500 is the default recipe, shipped with the package
    (the README's tables use it); another count is trained on first use (about 0.5 s a step) and cached."""
    num_samples: int = 256
    """Held-out samples per evaluated model (sample i: held-out prompt i mod 80, seed 1000 + i)."""
    guidance_scale: float = 3.0
    num_inference_steps: int = 20
    eval_batch_size: int = 256
    pair_prompts: int = 320
    """Training prompts sampled for DPO's pairs and the latent reward's data (320: every one). With half
    of them (160 pairs, 150 steps of 32) DPO's text-alignment gain vanished (+0.002 ± 0.006)."""
    pair_candidates: int = 4
    pair_inference_steps: int = 20
    dpo_steps: int = 300
    dpo_batch_size: int = 16
    dpo_beta: float = 5000.0
    dpo_lr: float = 3e-4
    nrg_weights: dict[str, float] = field(default_factory=lambda: {"vq": 1.0})
    nrg_strength: float = 1.0
    nrg_reward_steps: int = 120
    nrg_reward_batch_size: int = 32
    nrg_reward_blocks: int = 2
    """Trunk depth of the latent reward: the first k blocks of the base transformer."""
    nrg_counterfactual_pairs: int = 512
    onestep_steps: int = 80
    onestep_batch_size: int = 32
    grpo_steps: int = 60
    """Flow-GRPO steps; with the defaults below (8 prompts x K = 4, random window of 2, lr 3e-3, reward ta)
    the measured held-out gain is Δta +0.030 ± 0.010 at Δvq −0.044 ± 0.010 (docs/results.md)."""
    grpo_prompts_per_step: int = 8
    grpo_samples: int = 4
    grpo_inference_steps: int = 10
    grpo_window: int = 2
    """SDE steps trained per optimizer step (a random window of this many)."""
    grpo_lr: float = 3e-3
    grpo_weights: dict[str, float] = field(default_factory=lambda: {"ta": 1.0})
    threads: int | None = None
    """Torch intra-op threads (None: one per physical core not kept busy by another process, see
    :func:`demo_threads`; the setting before the demo is restored after it)."""


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings count once).

    One torch thread per physical core keeps every core busy; a second thread per core (SMT) only
    contends for the same execution units, and more threads than cores stall on each other.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            core = (topology / "core_id").read_text().strip()
            package = (topology / "physical_package_id").read_text().strip()
        except OSError:
            core, package = str(cpu), "0"  # no topology (not Linux): count logical CPUs
        cores.add((package, core))
    return max(1, len(cores))


def busy_cpus(samples: int = 5, interval: float = 0.1) -> int:
    """Other threads running right now (median of a few reads of /proc/loadavg's running count, less
    this process); 0 where there is no /proc."""
    counts = []
    for k in range(samples):
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        counts.append(max(0, running - 1))
        if k + 1 < samples:
            time.sleep(interval)
    return sorted(counts)[len(counts) // 2]


def demo_threads() -> int:
    """Torch threads for the demo: one per physical core that no other process keeps busy (at least 1).

    Measured on 2 EPYC cores with other CPU-bound processes running, 2 threads sampled 128 held-out
    images in 58-61 s where 1 thread took 21-28 s: each step waits for the thread that shares its
    core, so a thread per busy core costs more than it brings. On an idle machine this is every
    physical core.
    """
    return max(1, physical_cores() - busy_cpus())


SECONDS_PER_PASS = 3.5e-3
"""Reference speed: seconds of one transformer pass of one 32x32 sample on one EPYC core (the base
stage's 256 held-out samples, 20 steps with CFG: 36 s of CPU time)."""


def stage_work(stage: str, c: DemoConfig) -> float:
    """A stage's work in sample passes (CFG doubles sampling); the training and guidance factors are
    the measured CPU-time ratios of each stage to the base stage at the default settings."""
    cfg = 2 if c.guidance_scale != 1 else 1
    evaluation = c.num_samples * c.num_inference_steps * cfg
    pairs = c.pair_prompts * c.pair_candidates * c.pair_inference_steps * cfg
    if stage == "base":  # training, when the base is neither shipped nor cached: 64 images a step
        return evaluation + (0 if _base_ready(c) else c.base_steps * 64 * 3)
    if stage == "dpo":
        return pairs + c.dpo_steps * c.dpo_batch_size * 4 + evaluation  # policy + reference, both samples
    if stage == "nrg":  # the reward reads half the model; guidance adds its gradient to each step
        samples = 0 if "dpo" in c.stages else pairs
        return samples + c.nrg_reward_steps * c.nrg_reward_batch_size * 2.5 + evaluation * 1.3
    if stage == "grpo":  # SDE sampling with CFG, then policy + reference on the trained window
        sampled = c.grpo_steps * c.grpo_prompts_per_step * c.grpo_samples
        return sampled * (c.grpo_inference_steps * cfg + c.grpo_window * cfg * 4) + evaluation
    if stage == "onestep":  # generator, teacher with CFG, fake score and discriminator per sample
        return c.onestep_steps * c.onestep_batch_size * 5.5 + c.num_samples
    if stage == "report":
        return c.num_samples * len(c.stages) * 0.3
    raise ValueError(f"unknown demo stage {stage!r}")


def _base_ready(c: DemoConfig) -> bool:
    from flowalign.experiments.toy_base import ToyBaseRecipe, shipped_toy_base
    from flowalign.toy.data import cache_root

    recipe = ToyBaseRecipe(kind="image", steps=c.base_steps)
    cached = (cache_root() / recipe.key() / "model" / "model_index.json").is_file()
    return cached or shipped_toy_base(recipe) is not None


def _say(text: str, *, end: str = "\n", quiet: bool = False) -> None:
    if not quiet:
        print(text, end=end, file=sys.stdout, flush=True)


def _clock(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def run_demo(config: DemoConfig, *, progress: bool = True) -> DemoReport:
    """Run the chosen stages; returns the report (also written to ``config.out_dir``).

    ``progress`` prints one line per stage (what it does, its estimate, then the time it took) and at
    the end the files to open.
    """
    unknown = [s for s in config.stages if s not in AVAILABLE_STAGES]
    if unknown:
        raise ValueError(f"unknown demo stage(s) {unknown}; available: {', '.join(AVAILABLE_STAGES)}")
    if config.num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {config.num_samples}")
    stages = ("base", *[s for s in AVAILABLE_STAGES[1:] if s in config.stages], "report")
    out_dir = Path(config.out_dir)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads or demo_threads())
    try:
        _quiet_libraries()
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
        for stale in ("base_samples", "samples"):  # a re-run samples afresh
            shutil.rmtree(out_dir / stale, ignore_errors=True)
        report = DemoReport(out_dir)
        ctx = demo_stages.DemoContext(report=report, out_dir=out_dir)
        _say(
            f"flowalign demo: {len(stages)} stages, {torch.get_num_threads()} threads, output {out_dir}",
            quiet=not progress,
        )
        speed = SECONDS_PER_PASS
        for k, stage in enumerate(stages, 1):
            work = stage_work(stage, config)
            eta = work * speed
            _say(
                f"[{k}/{len(stages)}] {DESCRIPTIONS[stage](config)} (about {_clock(eta)}) ...",
                end="",
                quiet=not progress,
            )
            shutil.rmtree(out_dir / STAGE_FOLDERS.get(stage, "-"), ignore_errors=True)  # a re-run redoes it
            start, cpu = time.perf_counter(), time.process_time()
            RUNNERS[stage](config, ctx)
            seconds = time.perf_counter() - start
            report.stage_done(stage, seconds, cpu_seconds=time.process_time() - cpu)
            speed = seconds / work if stage == "base" else speed
            _say(f" done in {_clock(seconds)}", quiet=not progress)
        report.write()
        _say(f"open {out_dir / 'summary.md'} and {out_dir / 'index.html'}", quiet=not progress)
        return report
    finally:
        torch.set_num_threads(threads_before)


def _quiet_libraries() -> None:
    """Turn off the loading bars of diffusers and transformers: the demo prints one line per stage."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


DESCRIPTIONS = {
    "base": lambda c: (
        f"base: {'load' if _base_ready(c) else 'train'} the {c.base_steps}-step toy base, "
        f"{_plural(c.num_samples, 'held-out sample')}"
    ),
    "dpo": lambda c: (
        f"flow-dpo: {c.pair_prompts * c.pair_candidates} base samples -> "
        f"{c.pair_prompts} pairs, {c.dpo_steps} DPO steps, evaluate"
    ),
    "nrg": lambda c: f"flow-nrg: latent reward, {c.nrg_reward_steps} steps, guided sampling",
    "grpo": lambda c: (
        f"flow-grpo: {c.grpo_steps} steps of {c.grpo_prompts_per_step} prompts x {c.grpo_samples} SDE samples, evaluate"
    ),
    "onestep": lambda c: f"one-step: f-distill, {c.onestep_steps} steps, evaluate",
    "report": lambda c: "report: score every sample, write report/report.html",
}
RUNNERS = {
    "base": demo_stages.stage_base,
    "dpo": demo_stages.stage_dpo,
    "nrg": demo_stages.stage_nrg,
    "grpo": demo_stages.stage_grpo,
    "onestep": demo_stages.stage_onestep,
    "report": demo_stages.stage_report,
}
STAGE_FOLDERS = {
    "dpo": "dpo",
    "nrg": "nrg",
    "grpo": "grpo",
    "onestep": "onestep",
    "report": "report",
}
