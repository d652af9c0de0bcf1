"""2-process worker for test_distributed (run under ``accelerate launch --multi_gpu --num_processes 2``).

usage: dist_worker.py OUTPUT_DIR
Trains the toy method with batch_size 2 per process (global batch 4) and prints markers:
``WORLD=<n> RANK=<r> TYPE=<distributed type>`` on every rank, ``PARAMS-EQUAL=<bool>`` and
``DIST-DONE`` on the main process. Ends with the gloo exit workaround (docs/design.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

torch.set_num_threads(1)

from test_distributed import dist_config  # noqa: E402
from training_toy import ToyFlowMatching, VectorDataset  # noqa: E402

from flowalign.training.loop import train  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    method = ToyFlowMatching()
    result = train(method, VectorDataset(12), dist_config(out, batch_size=2), progress=False)
    from accelerate import PartialState

    state = PartialState()
    print(f"WORLD={state.num_processes} RANK={state.process_index} TYPE={state.distributed_type}", flush=True)
    flat = torch.cat([p.detach().reshape(-1) for p in method.net.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(state.num_processes)]
    dist.all_gather(gathered, flat)
    if state.is_main_process:
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        print(f"PARAMS-EQUAL={same} STEP={result.step}", flush=True)
        print("DIST-DONE", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
