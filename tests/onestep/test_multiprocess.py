"""Multi-process safety: the ratio-bin statistics and the weight mean are global (summed across ranks)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from dist_helpers import data, weights_worker

from flowalign.objectives.fdistill import RatioBinEMA, f_distill_weights
from flowalign.training.methods.onestep_common import dist_sum


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dist_sum_is_identity_without_a_process_group():
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(dist_sum(x), x)


@pytest.mark.slow  # two spawned processes import torch + flowalign (~30 s on 2 shared cores)
def test_two_ranks_give_the_weights_of_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(weights_worker, args=(2, _port(), str(tmp_path)), nprocs=2, join=True)
    logits, t = data()
    state = RatioBinEMA(num_bins=4, decay=0.5)
    for _ in range(2):
        want, _ = f_distill_weights(logits, t, divergence="kl", ratio_state=state)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # Every quantity is positive (r = e^l, counts, KL's h(r) = r), so a sum of n of them in any order
    # lies within gamma_(n-1) = (n-1)u / (1-(n-1)u) of the exact sum: the two processes' sums (each
    # rank's half, then the all-reduce) and the one process's differ relatively by at most
    # d = 2 gamma_15 (n = 16 samples). Then, allowing 2u for each rounded operation on inputs that
    # already differ: bin mean sum/count and the decay-0.5 EMA update, d + 8u; r / m, d + 10u; the
    # global mean of h, (d + 10u) + d + 2u; the weight h / mean, 3d + 24u.
    u = torch.finfo(torch.float32).eps / 2
    d = 2 * 15 * u / (1 - 15 * u)
    weights = torch.cat([p["weights"] for p in parts])
    assert ((weights - want).abs() <= (3 * d + 24 * u) * want.abs()).all()
    for p in parts:
        assert ((p["means"] - state.means).abs() <= (d + 8 * u) * state.means.abs()).all()
    # a per-rank normalisation (no all-reduce) would differ: the test can tell
    local, _ = f_distill_weights(logits[:8], t[:8], divergence="kl", ratio_state=RatioBinEMA(num_bins=4))
    assert not torch.allclose(local, want[:8])
