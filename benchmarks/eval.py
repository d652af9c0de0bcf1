"""End-to-end evaluation throughput on the toy world: samples scored per second, and where the time goes.

Three runs on the same model, prompts, seeds and settings:

- ``in-memory``: the baseline, what a hand-written loop does (sample a batch with FlowPipeline, score
  the tensors with the exact oracles; no files, no statistics, no report);
- ``run_eval cold``: ``flowalign eval`` from an empty folder: generate files + manifest, score files
  incrementally, compute every metric, write report.json and report.html;
- ``run_eval warm``: the same call again on the same folder: every sample and score is reused, so
  this is the cost of the statistics and the report alone.

Prints samples/s for each, the cold run's share of time in generation, scoring, metrics and report,
and the ratio cold / in-memory (the overhead of files, incremental state and the report).

    python benchmarks/eval.py                                 # toy base model if cached, else random init
    python benchmarks/eval.py --model ~/.cache/flowalign/toy-image-1500-*/model --num-prompts 80 --k 4
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def _model_dir(arg: str | None, workdir: Path) -> tuple[Path, str]:
    if arg:
        return Path(os.path.expanduser(arg)), "given"
    cached = sorted(glob.glob(os.path.expanduser("~/.cache/flowalign/toy-image-*/model/model_index.json")))
    if cached:
        return Path(cached[-1]).parent, "cached toy base model"
    from flowalign.models.toy import save_toy_model

    return save_toy_model(workdir / "random-toy"), "random-init toy model (no trained base cached)"


def _in_memory(model_dir: Path, prompts: list[str], k: int, steps: int, batch: int, seed: int) -> float:
    from flowalign.models import load_flow_model
    from flowalign.pipelines import FlowPipeline
    from flowalign.toy.oracles import score_images

    start = time.perf_counter()
    model = load_flow_model(model_dir)
    pipe = FlowPipeline(model)
    jobs = [(p, seed + i) for i, p in enumerate(p for p in prompts for _ in range(k))]
    for lo in range(0, len(jobs), batch):
        chunk = jobs[lo : lo + batch]
        out = pipe([p for p, _ in chunk], num_inference_steps=steps,
                   generator=[torch.Generator().manual_seed(s) for _, s in chunk])  # fmt: skip
        score_images(out.media.float().clamp(0, 1), [p for p, _ in chunk])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="toy model folder (default: cached base, else random)")
    parser.add_argument(
        "--num-prompts", type=int, default=32, help="held-out toy prompts (spread over the set)"
    )
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the CI machine has 2 shared cores)"
    )
    parser.add_argument("--keep", default=None, help="write the evaluation folder here instead of a temp dir")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from flowalign.evals import EvalOptions, load_prompt_set, run_eval
    from flowalign.pipelines.generate_files import GenerationSettings

    work = Path(tempfile.mkdtemp(prefix="flowalign-eval-bench-"))
    try:
        model_dir, source = _model_dir(args.model, work)
        pset = load_prompt_set(f"toy-heldout@{args.num_prompts}")
        n = len(pset.prompts) * args.k
        print(f"model: {model_dir} ({source}); {len(pset.prompts)} prompts x {args.k} samples = {n}, "
              f"{args.steps} steps, batch {args.batch_size}, {args.threads} thread(s)")  # fmt: skip

        baseline = _in_memory(model_dir, list(pset.prompts), args.k, args.steps, args.batch_size, seed=0)
        out_dir = Path(args.keep) if args.keep else work / "eval"
        if out_dir.exists():
            shutil.rmtree(out_dir)
        options = EvalOptions(settings=GenerationSettings(num_inference_steps=args.steps, guidance_scale=None),
                              batch_size=args.batch_size)  # fmt: skip
        runs = {}
        for name in ("cold", "warm"):
            start = time.perf_counter()
            result = run_eval({"base": model_dir}, pset, ["toy"], samples_per_prompt=args.k, seeds=[0],
                              out_dir=out_dir, options=options, progress=False)  # fmt: skip
            runs[name] = (time.perf_counter() - start, result)
        cold_s, cold = runs["cold"]
        warm_s, _ = runs["warm"]
        t = cold.report["timings"]
        render_s = cold_s - t["generate_s"] - t["score_s"] - t["metrics_s"]

        print(f"\n{'run':<16} {'seconds':>9} {'samples/s':>10}")
        for name, secs in (("in-memory", baseline), ("run_eval cold", cold_s), ("run_eval warm", warm_s)):
            print(f"{name:<16} {secs:>9.2f} {n / secs:>10.1f}")
        print(f"\ncold run: generation {t['generate_s']:.2f} s ({100 * t['generate_s'] / cold_s:.0f}%), "
              f"scoring {t['score_s']:.2f} s ({100 * t['score_s'] / cold_s:.0f}%), "
              f"metrics {t['metrics_s']:.2f} s ({100 * t['metrics_s'] / cold_s:.0f}%), "
              f"report {render_s:.2f} s ({100 * render_s / cold_s:.0f}%)")  # fmt: skip
        print(f"scoring alone: {n / t['score_s']:.1f} samples/s (decode files + oracles + jsonl)")
        print(f"overhead of run_eval over the in-memory loop: {cold_s / baseline:.2f}x; "
              f"a warm re-run costs {warm_s / cold_s:.0%} of a cold one")  # fmt: skip
        res = cold.report["results"][pset.name]["stats"]["base"]
        print("scores: " + ", ".join(f"{d} {s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
                                     for d, s in res.items()))  # fmt: skip
        if cold.failures:
            print("failures:", cold.failures)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
