"""Worker for the two-process test of the all-reduced f-distill statistics (imported by spawned children)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, generator=g) * 2, torch.rand(n, generator=g)


def weights_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from flowalign.objectives.fdistill import RatioBinEMA, f_distill_weights
    from flowalign.training.methods.onestep_common import dist_sum

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        logits, t = data()
        part = slice(rank * len(t) // world, (rank + 1) * len(t) // world)
        state = RatioBinEMA(num_bins=4, decay=0.5)
        for _ in range(2):  # two steps: the EMA must stay identical on every rank
            w, _ = f_distill_weights(
                logits[part], t[part], divergence="kl", ratio_state=state, reduce_fn=dist_sum
            )
        torch.save({"weights": w, "means": state.means}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
