"""Child-process bodies of the fault-injection tests: each runs real work and is stopped for real.

The tests start these functions in a ``forkserver`` child (this module is preloaded in the server,
so a child starts in milliseconds instead of re-importing torch) and SIGKILL or SIGTERM it, or let it
SIGKILL itself at an exact point: inside a training step, after a checkpoint file is (partly) written,
around the rename that publishes a checkpoint, during the rotation that deletes an old one, between two
batches of ``flowalign score``, or between samples of ``flowalign eval``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from training_toy import ToyFlowMatching, VectorDataset

import flowalign.training.checkpoint as ckpt_mod
from flowalign.config import CheckpointConfig, EMAConfig, OptimConfig, TrainConfig
from flowalign.rewards.base import RewardModel
from flowalign.rewards.registry import available_rewards, register_reward
from flowalign.training.loop import train


def _warm_up() -> None:
    """Import now what a first train()/score/eval imports lazily (peft, accelerate, the CLI, torch's
    optimizer machinery), so forkserver children, forked from this preloaded module, start at once."""
    import accelerate.utils  # noqa: F401
    import tqdm.auto  # noqa: F401

    import flowalign.cli  # noqa: F401
    import flowalign.evals.runner  # noqa: F401
    import flowalign.models.lora  # noqa: F401
    import flowalign.models.toy  # noqa: F401
    import flowalign.rewards.scoring  # noqa: F401

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


if os.environ.get("FLOWALIGN_REL_WARM_UP") == "1":  # set only while the forkserver starts (see the tests)
    _warm_up()

STEPS = 8
CHECKPOINT_EVERY = 2
FILES_PER_CHECKPOINT = 9  # model-net, ema, optimizer, scheduler, rng, method_state, state, config, manifest
STARTED = "STARTED"
RESULT = "result.json"


def die() -> None:
    """SIGKILL this process (no handler, no cleanup, no flush: what an OOM kill or power cut leaves)."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached


def fault_config(out: str | Path) -> TrainConfig:
    """The run every kill trial interrupts (and the reference run it must reproduce)."""
    return TrainConfig(
        output_dir=Path(out),
        seed=11,
        max_steps=STEPS,
        batch_size=2,
        grad_accum_steps=2,
        log_every=1,
        trackers=[],
        cpu=True,
        optim=OptimConfig(lr=3e-3, schedule="cosine", warmup_steps=2),
        ema=EMAConfig(use=True, decay=0.8),
        checkpoint=CheckpointConfig(every=CHECKPOINT_EVERY, keep_last=2),
    )


class PacedToy(ToyFlowMatching):
    """The loop's toy method, optionally slowed down, announcing its start and dying at a chosen step."""

    def __init__(self, marker: Path, *, sleep: float = 0.0, die_at_step: int | None = None) -> None:
        super().__init__()
        self.marker, self.sleep, self.die_at_step = marker, sleep, die_at_step

    def compute_loss(self, batch: dict, ctx: Any, group: str):
        if not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
        if ctx.step == self.die_at_step and ctx.micro_step == 1:
            die()  # between the two micro-steps: gradients half accumulated
        if self.sleep:
            time.sleep(self.sleep)
        return super().compute_loss(batch, ctx, group)


def _install_checkpoint_faults(plan: dict[str, Any]) -> None:
    """Make this process SIGKILL itself at the point ``plan`` names (see test_fault_injection)."""
    kind = plan["kind"]
    if kind == "file":
        original, calls = ckpt_mod._write_file, [0]

        def write_then_die(path: Path, write) -> None:
            original(path, write)
            calls[0] += 1
            if calls[0] == plan["file_index"]:
                size = path.stat().st_size
                with open(path, "r+b") as fh:  # a write cut short: only part of the bytes reached the disk
                    fh.truncate(int(size * plan["fraction"]))
                die()

        ckpt_mod._write_file = write_then_die
    elif kind == "replace":
        original_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            publishing = Path(src).name.startswith(f"checkpoint-{plan['step']:08d}.tmp-")
            if publishing and plan["when"] == "before":
                die()
            result = original_replace(src, dst, *args, **kwargs)
            if publishing and plan["when"] == "after":
                die()  # renamed, folder not yet fsynced, rotation not done
            return result

        os.replace = replace
    elif kind == "rotate":
        original_rmtree, calls = ckpt_mod.shutil.rmtree, [0]

        def rmtree(path, *args, **kwargs):
            if ".del-" in Path(path).name:
                calls[0] += 1
                if calls[0] == plan["rotation"]:
                    files = sorted(Path(path).iterdir())
                    for f in files[: plan["deleted_files"]]:  # a deletion cut short
                        f.unlink()
                    die()
            return original_rmtree(path, *args, **kwargs)

        ckpt_mod.shutil.rmtree = rmtree


def train_with_faults(out: str, plan: dict[str, Any]) -> None:
    """Train the toy run in ``out`` until the fault in ``plan`` kills this process (or the run ends)."""
    torch.set_num_threads(1)
    out_dir = Path(out)
    _install_checkpoint_faults(plan)
    method = PacedToy(
        out_dir.parent / f"{out_dir.name}.{STARTED}",
        sleep=plan.get("sleep", 0.0),
        die_at_step=plan["step"] if plan["kind"] == "step" else None,
    )
    late_sigterm: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: late_sigterm.append(1))  # restored by train() when it returns
    result = train(method, VectorDataset(), fault_config(out_dir), progress=False)
    (out_dir.parent / f"{out_dir.name}.{RESULT}").write_text(
        json.dumps(
            {
                "step": result.step,
                "interrupted": result.interrupted,
                "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                "late_sigterm": bool(late_sigterm),
            }
        )
    )


# ---------------------------------------------------------------------------------------- scoring


class MeanColour(RewardModel):
    """Brightness and redness of images; SIGKILLs its process on batch ``REL_KILL_AT_BATCH`` (1-based)."""

    name = "rel-colour"
    dimensions = ("bright", "red")
    media_kind = "image"
    needs_prompts = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = 0

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        self.calls += 1
        if self.calls == int(os.environ.get("REL_KILL_AT_BATCH", "0")):
            die()
        red = images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))
        return {"bright": images.mean(dim=(1, 2, 3)), "red": red}


if "rel-colour" not in available_rewards():

    @register_reward("rel-colour")
    def _load_colour(*, device="cpu", dtype=torch.float32, **kwargs) -> MeanColour:
        return MeanColour(**kwargs)


def score_cli(args: list[str], env: dict[str, str]) -> None:
    """Run ``flowalign <args>`` (e.g. score) in this process with ``env`` set."""
    torch.set_num_threads(1)
    os.environ.update(env)
    from flowalign.cli import app

    app(args, standalone_mode=False)


def eval_run(out: str, model_dir: str, prompts_file: str, env: dict[str, str]) -> None:
    """``run_eval`` of one toy model; dies after ``REL_KILL_AT_SAVE`` saved samples or a scoring batch."""
    torch.set_num_threads(1)
    os.environ.update(env)
    kill_at_save = int(os.environ.get("REL_KILL_AT_SAVE", "0"))
    if kill_at_save:
        import flowalign.pipelines.generate_files as gen

        original, saved = gen.save_image, [0]

        def save_then_die(image, path) -> None:
            original(image, path)
            saved[0] += 1
            if saved[0] == kill_at_save:
                die()  # the image is on disk, its manifest row is not

        gen.save_image = save_then_die
    eval_once(out, model_dir, prompts_file)


def eval_once(out: str, model_dir: str, prompts_file: str):
    from flowalign.evals import EvalOptions, run_eval
    from flowalign.pipelines.generate_files import GenerationSettings

    options = EvalOptions(
        settings=GenerationSettings(num_inference_steps=2, height=16, width=16),
        num_resamples=50,
        batch_size=2,
    )
    return run_eval(
        {"toy": model_dir},
        prompts_file,
        ["rel-colour"],
        out_dir=out,
        samples_per_prompt=2,
        seeds=[0],
        options=options,
        render=False,
        progress=False,
    )
