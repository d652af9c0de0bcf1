"""Benchmark: flowalign's FlowPipeline vs diffusers' own pipeline on the same tiny model and settings.

    python benchmarks/generate.py [--family sd3|flux|wan] [--steps 8] [--batch 4] [--repeats 5]

Both produce the same output (tests/models/test_equivalence.py); this prints both times and the
ratio, measured interleaved in one process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from harness import interleaved, report  # noqa: E402

from flowalign.models import load_flow_model  # noqa: E402
from flowalign.models.tiny import save_tiny_model  # noqa: E402
from flowalign.pipelines import FlowPipeline  # noqa: E402

SETTINGS = {
    "sd3": dict(height=64, width=64, guidance_scale=5.0),
    "flux": dict(height=64, width=64, guidance_scale=3.5),
    "wan": dict(height=32, width=32, num_frames=9, guidance_scale=5.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="all", choices=["all", *SETTINGS])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    families = list(SETTINGS) if args.family == "all" else [args.family]
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            model = load_flow_model(save_tiny_model(family, Path(tmp) / family))
            model.max_sequence_length = 32
            prompts = ["a small red circle on the left"] * args.batch
            kwargs = dict(num_inference_steps=args.steps, **SETTINGS[family])

            def diffusers_run(model=model, kwargs=kwargs, prompts=prompts):
                with torch.no_grad():
                    model.pipe(
                        prompts,
                        generator=torch.Generator().manual_seed(0),
                        output_type="pt",
                        max_sequence_length=32,
                        **kwargs,
                    )

            def flowalign_run(model=model, kwargs=kwargs, prompts=prompts):
                FlowPipeline(model)(prompts, generator=torch.Generator().manual_seed(0), **kwargs)

            times = interleaved(
                {"diffusers pipeline": diffusers_run, "flowalign FlowPipeline": flowalign_run},
                repeats=args.repeats,
            )
            print(f"\n## {family}: batch {args.batch}, {args.steps} steps, {kwargs}")
            print(report(times["diffusers pipeline"], times["flowalign FlowPipeline"]))


if __name__ == "__main__":
    main()
