"""train.gradient_checkpointing for the multi-head reward model: open_clip's own switch on the CLIP
towers, block-wise on the heads, with the gradients of a plain run."""

from __future__ import annotations

import torch
from test_multihead import tiny_model

from flowalign.training.memory import enable_gradient_checkpointing


def test_reward_model_checkpoints_with_equal_gradients(images):
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            assert enable_gradient_checkpointing(model, "reward_model").startswith("blocks")
            assert model.clip.visual.transformer.grad_checkpointing
            assert hasattr(model.heads["vq"], "_flowalign_plain_forward")
        scores = model(images[:2], ["a cat", "a red dog"])
        sum(s.sum() for s in scores.values()).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:  # fp32, the same operations recomputed: equal up to a few roundings
            assert float((a - b).abs().max()) <= 64 * torch.finfo(torch.float32).eps * float(a.abs().max())
