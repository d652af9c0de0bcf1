"""EMA: the update rule, swapping weights in and out, state round trip."""

from __future__ import annotations

import pytest
import torch
from training_toy import make_net

from flowalign.training.ema import EMA


def test_update_follows_the_closed_form():
    net = make_net()
    ema = EMA({"net": net}, decay=0.9)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    for _ in range(5):
        ema.update({"net": net})
    # constant target p: shadow_n = p + d^n (shadow_0 - p)
    for name, p in net.named_parameters():
        expected = p.detach() + 0.9**5 * (start[f"net.{name}"] - p.detach())
        torch.testing.assert_close(ema.shadow[f"net.{name}"], expected, rtol=0, atol=1e-6)
    assert ema.num_updates == 5


def test_shadow_is_fp32_and_tracks_only_trainable_parameters():
    net = make_net().to(torch.bfloat16)
    net[0].requires_grad_(False)
    ema = EMA({"net": net}, decay=0.5)
    assert sorted(ema.shadow) == ["net.2.bias", "net.2.weight"]
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())


def test_swapped_in_restores_training_weights_and_state_round_trips():
    net = make_net()
    ema = EMA({"net": net}, decay=0.0)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2)
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    with ema.swapped_in({"net": net}):
        assert all(torch.equal(v, ema.shadow[f"net.{k}"]) for k, v in net.state_dict().items())
    assert all(torch.equal(v, trained[k]) for k, v in net.state_dict().items())
    other = EMA({"net": make_net(seed=1)}, decay=0.0)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.shadow[k], v) for k, v in ema.shadow.items())
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"net.2.bias": torch.zeros(6)})
    with pytest.raises(ValueError, match="decay must lie in"):
        EMA({"net": net}, decay=1.0)
