"""train.gradient_checkpointing for f-distill: every trainable module (generator, fake score and the
discriminator heads) gets it, and the gradients equal those without it."""

from __future__ import annotations

import torch
from onestep_helpers import SIZE, make_batch, run_group

from flowalign.models import load_flow_model
from flowalign.training.memory import enable_gradient_checkpointing
from flowalign.training.methods.fdistill import FDistill, FDistillConfig


def _method(teacher_dir, checkpointing: bool) -> FDistill:
    torch.manual_seed(0)
    cfg = FDistillConfig(height=SIZE, width=SIZE, divergence="js", gan_weight=0.1, r1_weight=1.0)
    method = FDistill(load_flow_model(teacher_dir), cfg)
    if checkpointing:
        for name, module in method.trainable_modules().items():
            enable_gradient_checkpointing(module, name)
    return method


def test_discriminator_heads_checkpoint_with_the_same_gradients(teacher_dir):
    plain, ckpt = _method(teacher_dir, False), _method(teacher_dir, True)
    assert set(ckpt.trainable_modules()) == {"generator", "fake_score", "discriminator"}
    heads = ckpt.discriminator.heads
    calls = []
    hook = heads[0][1].register_forward_hook(lambda *a: calls.append(1))
    for group, step in (("critic", 1), ("generator", 0)):
        for m in (plain, ckpt):
            for p in (q for mod in m.trainable_modules().values() for q in mod.parameters()):
                p.grad = None
        loss_p, _ = run_group(plain, make_batch(), group, step=step)
        calls.clear()
        loss_c, _ = run_group(ckpt, make_batch(), group, step=step)
        if group == "critic":
            assert len(calls) > 1  # the head ran again in the backward pass: its activations were dropped
        assert torch.equal(loss_p, loss_c)
        for name, module in plain.trainable_modules().items():
            for (pname, p), q in zip(
                module.named_parameters(), ckpt.trainable_modules()[name].parameters(), strict=True
            ):
                if p.grad is None:
                    assert q.grad is None, (group, name, pname)
                    continue
                # same operations recomputed in fp32: equal up to a few roundings of the largest entry
                bound = 64 * torch.finfo(torch.float32).eps * float(p.grad.abs().max()) + 1e-30
                assert float((p.grad - q.grad).abs().max()) <= bound, (group, name, pname)
    hook.remove()
