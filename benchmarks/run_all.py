"""Run the CPU tiny version of every benchmark and print one table of their ratios (flowalign vs baseline).

    python benchmarks/run_all.py --quick                    # about 5 minutes on 2 cores
    nice -n 10 python benchmarks/run_all.py                 # the scripts' own (longer) CPU settings
    python benchmarks/run_all.py --quick --only dpo_step,score --json ratios.json

Each benchmark runs as its own subprocess with tiny models (nothing downloaded), and the ratios it
prints are read back from its output (or its ``--json`` file). A benchmark that fails or runs past
``--timeout`` gets an error row; the others still run. The "meaning" column says what each ratio
divides and which way is better. Timings on a shared machine are noisy: a ratio near 1 says
"no difference", not "slower". The real-size numbers come from ``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass
class Measure:
    """One ratio read from a benchmark's output."""

    measure: str
    ratio: float
    meaning: str


@dataclass
class Bench:
    """A benchmark script, its argument sets and the parser of its output."""

    name: str
    args: list[str]
    """Arguments of the normal CPU run (besides the script's defaults)."""
    quick: list[str]
    """Arguments of the ``--quick`` run."""
    parse: Callable[[str, dict | None], list[Measure]]
    """(stdout, the --json file's content or None) -> ratios."""
    json_flag: bool = False
    """The script writes its numbers to ``--json PATH``."""


@dataclass
class Result:
    name: str
    seconds: float
    measures: list[Measure] = field(default_factory=list)
    error: str = ""


def _find(pattern: str, text: str, what: str) -> re.Match:
    match = re.search(pattern, text, flags=re.M)
    if match is None:
        raise ValueError(f"{what}: pattern {pattern!r} not found in the output")
    return match


def parse_dpo_step(out: str, data: dict | None) -> list[Measure]:
    m = _find(
        r"speed-up \(baseline / ours\): ([\d.]+)x; peak memory ratio \(ours / baseline\): ([\d.]+)",
        out,
        "dpo_step",
    )
    return [
        Measure("Flow-DPO step time", float(m[1]), "straightforward 4-forward step / flowalign step (> 1: ours faster)"),
        Measure("Flow-DPO peak memory", float(m[2]), "ours / baseline, process peak RSS (< 1: ours smaller)"),
    ]  # fmt: skip


def parse_dpo_step_cache(out: str, data: dict | None) -> list[Measure]:
    m = _find(
        r"speed-up \(per-step / cached\): ([\d.]+)x; peak RSS ratio \(cached / per-step\): ([\d.]+); "
        r"step-module memory ratio \(cached / per-step\): ([\d.]+)",
        out,
        "dpo_step_cache",
    )
    return [
        Measure("DPO step, cached prompts", float(m[1]), "per-step encoding / cached embeddings (> 1: cache faster)"),
        Measure("DPO step peak RSS, cached", float(m[2]), "cached / per-step, process peak RSS (CPU keeps encoders in RAM)"),
        Measure("DPO step modules, cached", float(m[3]), "cached / per-step, weights placed on the device (< 1: smaller)"),
    ]  # fmt: skip


def parse_score(out: str, data: dict | None) -> list[Measure]:
    if data is None:
        raise ValueError("score: no --json output")
    return [
        Measure(
            "reward scoring images/s", data["ratio"],
            f"flowalign batched / per-image PIL (> 1: ours faster); max score diff {data['max_abs_score_diff']:.1e}",
        )
    ]  # fmt: skip


def parse_generate(out: str, data: dict | None) -> list[Measure]:
    found = re.findall(r"^## (\w+): .*?speed-up \(baseline / ours\): ([\d.]+)x", out, flags=re.M | re.S)
    if not found:
        raise ValueError("generate: no 'speed-up' lines in the output")
    return [
        Measure(f"sampling {family}", float(r), "diffusers pipeline / FlowPipeline (> 1: ours faster)")
        for family, r in found
    ]


def parse_nrg(out: str, data: dict | None) -> list[Measure]:
    latent = _find(r"^latent\s+[\d.]+\s+([\d.]+)$", out, "nrg")
    m = _find(r"time ratio pixel / latent: ([\d.]+), pixel\+model / latent: ([\d.]+)", out, "nrg")
    return [
        Measure("Flow-NRG latent guidance cost", float(latent[1]), "guided / unguided sampling time (1 = free)"),
        Measure("pixel vs latent guidance", float(m[1]), "pixel-reward guidance / latent guidance (> 1: latent faster)"),
        Measure("pixel+model vs latent guidance", float(m[2]), "DPS-style pixel guidance / latent (> 1: latent faster)"),
    ]  # fmt: skip


def parse_cdt(out: str, data: dict | None) -> list[Measure]:
    if not data:
        raise ValueError("cdt: no --json output")
    result = next(iter(data.values()))
    fps = result["frames_per_s"]
    return [
        Measure("CDT encode frames/s", fps["cdt encode"] / fps["wan encode"], "CDT / Wan VAE (> 1: CDT faster)"),
        Measure("CDT decode frames/s", fps["cdt decode (1 step)"] / fps["wan decode"], "CDT 1-step / Wan VAE (> 1: CDT faster)"),
    ]  # fmt: skip


def parse_fdistill(out: str, data: dict | None) -> list[Measure]:
    m = _find(r"speed-up teacher / one-step: ([\d.]+)x", out, "fdistill")
    steps = _find(r"^teacher (\d+)-step", out, "fdistill")[1]
    return [
        Measure(
            "one-step vs teacher sampling",
            float(m[1]),
            f"teacher {steps}-step CFG / one step (> 1: one step faster)",
        )
    ]


def parse_distar(out: str, data: dict | None) -> list[Measure]:
    rows = []
    for label, name in (
        ("DI\\* \\(score div\\.\\)", "DI* score-div."),
        ("DI\\* \\(KL baseline\\)", "DI* KL"),
    ):
        m = _find(rf"^{label}\s+.*?([\d.]+)$", out, "distar")
        rows.append(
            Measure(
                f"{name} generator step", float(m[1]), "its generator step / f-distill's (cost, 1 = same)"
            )
        )
    return rows


def parse_eval(out: str, data: dict | None) -> list[Measure]:
    m = _find(
        r"overhead of run_eval over the in-memory loop: ([\d.]+)x; a warm re-run costs (\d+)%", out, "eval"
    )
    return [
        Measure("run_eval vs in-memory loop", float(m[1]), "cold run_eval / hand-written loop (files + report cost)"),
        Measure("run_eval warm re-run", int(m[2]) / 100, "warm / cold (samples and scores reused)"),
    ]  # fmt: skip


BENCHES = [
    Bench("dpo_step", ["--steps", "5", "--warmup", "1"], ["--resolution", "64", "--steps", "2", "--warmup", "1"], parse_dpo_step),
    Bench("dpo_step_cache", [], ["--layers", "6", "--hidden", "256", "--steps", "2"], parse_dpo_step_cache),
    Bench("score", ["--threads", "1"], ["--threads", "1", "--num-images", "16", "--repeats", "2"], parse_score, json_flag=True),
    Bench("generate", [], ["--steps", "4", "--batch", "1", "--repeats", "2"], parse_generate),
    Bench("nrg", [], ["--steps", "4", "--batch", "1", "--repeats", "2"], parse_nrg),
    Bench("cdt", [], ["--repeats", "2"], parse_cdt, json_flag=True),
    Bench("fdistill", ["--threads", "1"], ["--threads", "1", "--batch", "2", "--steps", "8", "--repeats", "2"], parse_fdistill),
    Bench("distar", ["--threads", "1"], ["--threads", "1", "--batch", "1", "--repeats", "2"], parse_distar),
    Bench("eval", ["--threads", "1"], ["--threads", "1", "--num-prompts", "8", "--k", "2", "--steps", "8"], parse_eval),
]  # fmt: skip


def run_bench(bench: Bench, *, quick: bool, timeout: float, threads: int) -> Result:
    """Run one benchmark script in a subprocess and read its ratios."""
    args = list(bench.quick if quick else bench.args)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / f"{bench.name}.json"
        if bench.json_flag:
            args += ["--json", str(json_path)]
        cmd = [sys.executable, str(HERE / f"{bench.name}.py"), *args]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parent
            )
        except subprocess.TimeoutExpired:
            return Result(bench.name, time.perf_counter() - start, error=f"timed out after {timeout:.0f} s")
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            return Result(bench.name, seconds, error=f"exit {proc.returncode}: {tail}")
        data = json.loads(json_path.read_text()) if bench.json_flag and json_path.exists() else None
        try:
            return Result(bench.name, seconds, bench.parse(proc.stdout, data))
        except (ValueError, KeyError, StopIteration) as err:
            return Result(bench.name, seconds, error=f"could not read the output: {err}")


def table(results: list[Result]) -> str:
    head = f"{'benchmark':<10} {'measure':<32} {'ratio':>8}  {'seconds':>7}  meaning"
    lines = [head, "-" * len(head)]
    for r in results:
        if r.error:
            lines.append(f"{r.name:<10} {'ERROR':<32} {'-':>8}  {r.seconds:>7.1f}  {r.error}")
        for i, m in enumerate(r.measures):
            seconds = f"{r.seconds:>7.1f}" if i == 0 else " " * 7
            lines.append(f"{r.name:<10} {m.measure:<32} {m.ratio:>8.2f}  {seconds}  {m.meaning}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings (about 5 minutes on 2 cores)")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated subset of {','.join(b.name for b in BENCHES)}"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per benchmark (default 300 quick, 1200)"
    )
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of each benchmark process")
    parser.add_argument("--json", type=Path, default=None, help="also write the ratios here")
    args = parser.parse_args(argv)
    benches = BENCHES
    if args.only:
        wanted = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = sorted(set(wanted) - {b.name for b in BENCHES})
        if unknown:
            parser.error(f"unknown benchmarks {unknown}; choose from {[b.name for b in BENCHES]}")
        benches = [b for b in BENCHES if b.name in wanted]
    timeout = args.timeout or (300.0 if args.quick else 1200.0)
    results = []
    start = time.perf_counter()
    for bench in benches:
        print(f"running {bench.name} ...", flush=True)
        result = run_bench(bench, quick=args.quick, timeout=timeout, threads=args.threads)
        status = result.error or ", ".join(f"{m.measure} {m.ratio:.2f}" for m in result.measures)
        print(f"  {result.seconds:.1f} s: {status}", flush=True)
        results.append(result)
    total = time.perf_counter() - start
    mode = "quick" if args.quick else "normal"
    print(f"\n## benchmark ratios, CPU tiny models ({mode} settings), {total:.0f} s in total\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
