"""Subprocess for test_checkpoint: trains the toy method and hangs inside the write of one checkpoint.

usage: python fault_worker.py OUTPUT_DIR HANG_AT_STEP
Writes OUTPUT_DIR/WRITING once the hanging checkpoint has its weight file on disk (no manifest yet),
then sleeps until the test SIGKILLs it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from training_toy import ToyFlowMatching, VectorDataset, toy_config  # noqa: E402

import flowalign.training.checkpoint as ckpt  # noqa: E402
from flowalign.training.loop import train  # noqa: E402


def main() -> None:
    out, hang_step = Path(sys.argv[1]), int(sys.argv[2])
    original = ckpt._write_file

    def write_then_hang(path: Path, write) -> None:
        original(path, write)
        if path.parent.name.startswith(f"checkpoint-{hang_step:08d}.tmp-") and path.name.startswith("model-"):
            (out / "WRITING").write_text(str(os.getpid()))
            time.sleep(300)

    ckpt._write_file = write_then_hang
    cfg = toy_config(out, max_steps=6)
    cfg.checkpoint.every = 2
    cfg.checkpoint.keep_last = None
    train(ToyFlowMatching(), VectorDataset(), cfg, progress=False)
    print("FINISHED-WITHOUT-HANGING", flush=True)


if __name__ == "__main__":
    main()
