"""The dtype policy of the one-step runs: the frozen teacher in the compute dtype of train.mixed_precision,
the trainable networks in fp32 with the exact fp32 weights of the teacher read from disk."""

from __future__ import annotations

import pytest
import torch
from onestep_helpers import SIZE, make_batch, run_group

from flowalign.config import ConfigError
from flowalign.models import load_flow_model
from flowalign.training.methods.distar import DiffInstructStar, DistarConfig
from flowalign.training.methods.fdistill import FDistill, FDistillConfig
from flowalign.training.methods.onestep_dtypes import frozen_dtype, load_run_teacher


def test_frozen_dtype_follows_mixed_precision_unless_set():
    assert frozen_dtype(None, "bf16") == torch.bfloat16 and frozen_dtype(None, "no") == torch.float32
    assert frozen_dtype(None, "fp16") == torch.float16 and frozen_dtype("fp32", "bf16") == torch.float32
    with pytest.raises(ConfigError, match="must be one of") as err:
        frozen_dtype("fp8", "no")
    assert err.value.key == "teacher_dtype"


@pytest.mark.parametrize("fake_score", ["full", "lora"])
def test_bf16_run_keeps_the_teacher_in_bf16_and_trainables_in_exact_fp32(teacher_dir, fake_score):
    """f-distill under mixed_precision bf16: text encoder and transformer of the teacher in bf16; the
    generator (and a full fake score) equal the fp32 weights on disk bit for bit (not bf16-rounded);
    LoRA adapters of a 'lora' fake score keep the fp32 values they were created with."""
    on_disk = load_flow_model(teacher_dir).transformer.state_dict()
    teacher = load_run_teacher(
        teacher_dir, method="f-distill", frozen=torch.bfloat16, device=torch.device("cpu")
    )
    method = FDistill(teacher, FDistillConfig(height=SIZE, width=SIZE, fake_score=fake_score))
    adapters = {n: p.detach().clone() for n, p in teacher.transformer.named_parameters() if p.requires_grad}
    method.keep_teacher_in(torch.bfloat16)
    assert teacher.compute_dtype == torch.bfloat16
    assert {p.dtype for p in teacher.pipe.text_encoder.parameters()} == {torch.bfloat16}
    frozen = {p.dtype for p in teacher.transformer.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    for name, p in teacher.transformer.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and torch.equal(p, adapters[name]), name
    assert (fake_score == "lora") == bool(adapters)
    nets = [method.generator, method.discriminator] + ([method.fake] if fake_score == "full" else [])
    for net in nets:
        assert {p.dtype for p in net.parameters()} == {torch.float32}
    for name, value in method.generator.state_dict().items():
        assert torch.equal(value, on_disk[name]), name
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the loop runs a bf16 step
        loss, _ = run_group(method, make_batch(), "critic", step=1)
    assert torch.isfinite(loss)


def test_distar_run_loader_applies_the_policy(teacher_dir):
    teacher = load_run_teacher(teacher_dir, method="DI*", frozen=torch.bfloat16, device=torch.device("cpu"))
    method = DiffInstructStar(teacher, DistarConfig(reward_scale=0.0, height=SIZE, width=SIZE))
    method.keep_teacher_in(torch.bfloat16)
    assert teacher.dtype == torch.bfloat16
    assert {p.dtype for p in method.generator.parameters()} == {torch.float32}
    assert {p.dtype for p in method.fake.parameters()} == {torch.float32}
