"""Generate, score, build pairs and evaluate the toy image model: run by the tests in one process and under
``accelerate launch --num_processes 2`` (the library splits the work itself).

    python sampling_worker.py TOY_DIR OUT_ROOT STAGES     (STAGES: comma separated, of gen,score,pairs,eval)

``FAULT_RANK`` / ``FAULT_AFTER``: the process of that rank ends with ``os._exit`` after writing that many
generated images (a kill in the middle of a run). Every image ``generate`` writes is logged as one line of
``OUT_ROOT/saves.log`` (pid and file), so a test can count what a re-run drew again.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROMPTS = [
    "a small red circle in the center",
    "a large blue square in the top left",
    "a large green triangle in the bottom right",
    "a small yellow cross in the center",
]
STEPS = 3


def _log_saves(out_root: Path) -> None:
    """Wrap generate's image writer: log each file, and die like a killed process when told to."""
    import flowalign.pipelines.generate_files as gen

    rank = int(os.environ.get("RANK", "0"))
    fault_after = int(os.environ["FAULT_AFTER"]) if os.environ.get("FAULT_RANK") == str(rank) else None
    original, count = gen.save_image, [0]

    def save_image(media, path):
        original(media, path)
        with open(out_root / "saves.log", "a") as log:
            log.write(f"{os.getpid()} {Path(path).name}\n")
        count[0] += 1
        if fault_after is not None and count[0] >= fault_after:
            os._exit(3)

    gen.save_image = save_image


def brightness_and_oracle(media, prompts):
    """The toy oracle's scores plus mean brightness as ``overall`` (a random-init model's samples all score
    the same on the oracle; brightness separates them, so pairs exist)."""
    from flowalign.rewards.combine import RewardCombiner
    from flowalign.rewards.toy import ToyOracleReward

    scores = RewardCombiner([ToyOracleReward()]).score(media, prompts)
    return {**scores, "bright": media.flatten(1).mean(1), "overall": media.flatten(1).mean(1)}


def run(toy_dir: str, out_root: Path, stages: list[str]) -> None:
    from flowalign.evals.runner import run_eval
    from flowalign.evals.types import EvalOptions
    from flowalign.models import load_flow_model
    from flowalign.pipelines.generate_files import GenerationSettings, generate_files
    from flowalign.rewards.scoring import score_files
    from flowalign.workflows.pairs import PairsConfig, build_pairs

    out_root.mkdir(parents=True, exist_ok=True)
    _log_saves(out_root)
    model = load_flow_model(toy_dir)
    if "gen" in stages:
        settings = GenerationSettings(num_inference_steps=STEPS, samples_per_prompt=3)
        generate_files(
            model, PROMPTS, out_root / "gen", settings, batch_size=2, model_name="toy", progress=False
        )
    if "score" in stages:
        score_files(
            ["toy"], out_root / "gen", out=out_root / "gen" / "scores.jsonl", batch_size=2, progress=False
        )
    if "pairs" in stages:
        config = PairsConfig(num_candidates=3, num_inference_steps=STEPS, batch_size=2)
        build_pairs(model, PROMPTS, brightness_and_oracle, out_root / "pairs", config, progress=False)
    if "eval" in stages:
        options = EvalOptions(
            settings=GenerationSettings(num_inference_steps=STEPS),
            batch_size=2,
            device="cpu",
            num_resamples=50,
        )
        run_eval(
            {"toy": toy_dir}, "toy-heldout@3", ["toy"], out_dir=out_root / "eval", samples_per_prompt=2,
            options=options, render=False, progress=False,
        )  # fmt: skip


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(","))
    print(
        f"SHARD-DONE WORLD={os.environ.get('WORLD_SIZE', '1')} RANK={os.environ.get('RANK', '0')}", flush=True
    )
