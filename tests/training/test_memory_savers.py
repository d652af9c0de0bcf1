"""Memory savers of the training config: 8-bit AdamW (bitsandbytes), block-wise gradient checkpointing."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from torch import nn

from flowalign.config import OptimConfig
from flowalign.training.memory import enable_gradient_checkpointing
from flowalign.training.optim import build_optimizer


def _param(seed: int = 0) -> nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(64, 64, generator=g))  # 4096 elements: 8-bit state


def _grad(p: nn.Parameter, seed: int) -> None:
    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + seed))


def test_adamw8bit_first_step_matches_adamw_and_keeps_8bit_state() -> None:
    pytest.importorskip("bitsandbytes", reason="8-bit AdamW is the bitsandbytes extra")
    cfg = OptimConfig(optimizer="adamw8bit", lr=1e-2, weight_decay=0.1)
    p8, p32 = _param(), _param()
    opt8 = build_optimizer([p8], cfg, device=torch.device("cpu"))
    opt32 = build_optimizer([p32], OptimConfig(lr=1e-2, weight_decay=0.1), device=torch.device("cpu"))
    for p, opt in ((p8, opt8), (p32, opt32)):
        _grad(p, 0)
        opt.step()
    state = opt8.state[p8]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    # step 1: m_hat = g, v_hat = g^2, so both updates are lr * g / (|g| + eps) after the decay; the
    # 8-bit one computes it from the fp32 moments before quantising them: equal up to a few roundings
    assert float((p8 - p32).abs().max()) <= 4 * torch.finfo(torch.float32).eps * float(p32.abs().max())
    # the stored moments are the quantised m = (1 - beta1) g and v = (1 - beta2) g^2, not fp32 copies
    assert state["state1"].numel() == p8.numel() and "absmax1" in state and "qmap1" in state


def test_adamw8bit_state_round_trips_for_resume() -> None:
    pytest.importorskip("bitsandbytes", reason="8-bit AdamW is the bitsandbytes extra")
    cfg = OptimConfig(optimizer="adamw8bit", lr=1e-2)
    straight, resumed = _param(), _param()
    opt = build_optimizer([straight], cfg, device=torch.device("cpu"))
    for k in range(3):
        _grad(straight, k)
        opt.step()
    opt_a = build_optimizer([resumed], cfg, device=torch.device("cpu"))
    _grad(resumed, 0)
    opt_a.step()
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    opt_b = build_optimizer([resumed], cfg, device=torch.device("cpu"))
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    for k in (1, 2):
        _grad(resumed, k)
        opt_b.step()
    assert torch.equal(straight, resumed)


def test_adamw8bit_without_bitsandbytes_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ValueError, match=r"pip install 'flowalign\[bitsandbytes\]'"):
        build_optimizer([_param()], OptimConfig(optimizer="adamw8bit"), device=torch.device("cpu"))


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x.square().sum()


def test_blockwise_checkpointing_recomputes_and_keeps_gradients() -> None:
    plain, ckpt = _Blocks(), _Blocks()
    assert enable_gradient_checkpointing(ckpt, "net") == "blocks (3)"
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    calls = []
    ckpt.blocks[0][0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    plain(x).backward()
    ckpt(x).backward()
    assert len(calls) == 2  # forward, then the recomputation in backward
    for p, q in zip(plain.parameters(), ckpt.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    calls.clear()
    with torch.no_grad():
        ckpt(x)
    assert len(calls) == 1


def test_checkpointing_refuses_a_module_without_blocks() -> None:
    with pytest.raises(ValueError, match=r"trainable module 'head' \(Linear\) has no"):
        enable_gradient_checkpointing(nn.Linear(2, 2), "head")


def test_latent_reward_trunk_blocks_checkpoint_with_equal_gradients(tiny_model_dir) -> None:
    from flowalign.models import load_flow_model
    from flowalign.rewards.latent import LatentRewardModel

    model = load_flow_model(str(tiny_model_dir("sd3")))
    with torch.no_grad():
        cond, _ = model.encode_prompt(["a cat", "a dog"])
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.rand(2, generator=g)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = LatentRewardModel.from_flow_model(model, dimensions=["a"], num_blocks=2).train()
        if checkpointing:
            enable_gradient_checkpointing(net, "latent_reward")
            wrapped = {n for n, m in net.named_modules() if hasattr(m, "_flowalign_plain_forward")}
            assert {"trunk.blocks.0", "trunk.blocks.1", "heads.a"} <= wrapped
        net(x, t, cond)["a"].sum().backward()
        grads.append([p.grad for p in net.parameters()])
    for a, b in zip(*grads, strict=True):
        # fp32 on the CPU, the same operations recomputed: equal up to a few roundings
        assert float((a - b).abs().max()) <= 64 * torch.finfo(torch.float32).eps * float(a.abs().max())
