"""Speed switches: regional torch.compile of transformer blocks and the attention backend setting."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from training_toy import ToyFlowMatching, VectorDataset

from flowalign.config import LoraConfig, TrainConfig
from flowalign.models.lora import add_lora
from flowalign.models.tiny import tiny_sd3_pipeline, tiny_wan_pipeline
from flowalign.training.loop import train
from flowalign.training.method import Method
from flowalign.training.speed import (
    check_attention_backend,
    compile_blocks,
    set_attention_backend,
)

EPS64 = torch.finfo(torch.float64).eps


def _sd3_inputs(transformer, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return {
        "hidden_states": torch.randn(batch, cfg.in_channels, 8, 8, generator=g, dtype=torch.float64),
        "timestep": torch.tensor([700.0, 250.0], dtype=torch.float64)[:batch],
        "encoder_hidden_states": torch.randn(
            batch, 5, cfg.joint_attention_dim, generator=g, dtype=torch.float64
        ),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g, dtype=torch.float64),
    }


def _lora_sd3() -> nn.Module:
    torch.manual_seed(0)
    transformer = tiny_sd3_pipeline().transformer.to(torch.float64)
    add_lora(transformer, LoraConfig(rank=4, init="gaussian"))
    for name, p in transformer.named_parameters():  # B != 0, so the adapters change the output
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    return transformer


def _loss_and_grads(transformer, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    transformer.zero_grad(set_to_none=True)
    out = transformer(**inputs, return_dict=False)[0]
    loss = (out**2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_close_fp64(a: torch.Tensor, b: torch.Tensor, terms: int) -> None:
    # a compiled graph may reorder floating-point sums; each output of this tiny network (width 64,
    # two blocks) is built from fewer than ``terms`` rounded operations, so the gap stays below
    # terms * eps64 relative to the largest magnitude
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-300)
    assert (a - b).abs().max().item() <= terms * EPS64 * scale


def _compiled_matches_eager(backend: str) -> None:
    torch._dynamo.reset()
    transformer = _lora_sd3()
    inputs = _sd3_inputs(transformer)
    eager_loss, eager_grads = _loss_and_grads(transformer, inputs)
    count = compile_blocks(transformer, "transformer", backend=backend)
    assert count == len(transformer.transformer_blocks) == 2  # each block, not the whole model
    assert transformer._compiled_call_impl is None
    assert all(block._compiled_call_impl is not None for block in transformer.transformer_blocks)
    loss, grads = _loss_and_grads(transformer, inputs)
    _assert_close_fp64(loss, eager_loss, terms=1 << 16)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        _assert_close_fp64(grads[name], eager_grads[name], terms=1 << 16)
    torch._dynamo.reset()


def test_regional_compile_traces_lora_blocks_to_the_eager_loss_and_gradients() -> None:
    """The traced blocks (dynamo, eager backend) run the same ops: loss and LoRA gradients as eager."""
    _compiled_matches_eager("eager")


@pytest.mark.slow
def test_regional_compile_with_inductor_matches_eager() -> None:
    """Inductor's generated kernels (needs a C compiler on CPU; minutes on 2 cores)."""
    _compiled_matches_eager("inductor")


def test_compile_refuses_a_module_without_blocks() -> None:
    with pytest.raises(ValueError, match=r"train.compile: module 'net' \(Linear\) has no repeated blocks"):
        compile_blocks(nn.Linear(2, 2), "net")


def test_unknown_attention_backend_is_one_error_naming_key_and_choices(tmp_path) -> None:
    cfg = TrainConfig(output_dir=tmp_path, max_steps=1, batch_size=2, cpu=True, trackers=[])
    cfg.attention_backend = "flashy"
    with pytest.raises(ValueError) as err:
        train(ToyFlowMatching(), VectorDataset(), cfg, progress=False)
    message = str(err.value)
    assert message.startswith("train.attention_backend: unknown attention backend 'flashy'")
    assert "sdpa" in message and "_native_math" in message and "xformers" in message


def test_missing_backend_package_is_named() -> None:
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"--attention-backend: .*'xformers' is not available.*extra"):
            check_attention_backend("xformers", key="--attention-backend")
    else:
        pytest.skip("xformers is installed here")


def test_sd3_refuses_a_dispatcher_only_backend() -> None:
    transformer = tiny_sd3_pipeline().transformer
    with pytest.raises(
        ValueError, match=r"SD3Transformer2DModel's attention .* choose one of sdpa, xformers"
    ):
        set_attention_backend(transformer, "_native_math")
    assert set_attention_backend(transformer, "sdpa") > 0


class _WanVelocity(Method):
    """One tiny Wan transformer trained to predict zero (enough to run the loop over real attention)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.transformer = tiny_wan_pipeline().transformer

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"transformer": self.transformer}

    def collate(self, items: list[dict]) -> dict:
        return {"index": torch.tensor([item["index"] for item in items])}

    def compute_loss(self, batch, ctx, group):
        cfg = self.transformer.config
        ids = batch["index"]
        x = ctx.randn((cfg.in_channels, 1, 4, 4), ids, key="x")
        text = ctx.randn((3, cfg.text_dim), ids, key="text")
        out = ctx.module("transformer")(
            hidden_states=x, timestep=(ids + 1).float() * 100, encoder_hidden_states=text, return_dict=False
        )[0]
        return (out**2).mean(), {}


def _backends(module: nn.Module) -> set:
    return {
        getattr(m.processor, "_attention_backend", "none")
        for m in module.modules()
        if getattr(m, "processor", None) is not None
    }


def test_attention_backend_reaches_the_trained_model_and_keeps_its_loss(tmp_path) -> None:
    """train.attention_backend switches every attention layer of the trained Wan transformer; the
    math kernel and SDPA compute the same softmax attention, so the first loss agrees to fp32
    rounding of a sum over the head width and the tokens (bound: 64 * eps32 relative)."""
    losses = {}
    for backend in ("_native_math", "sdpa"):
        cfg = TrainConfig(output_dir=tmp_path / backend, max_steps=1, batch_size=2, cpu=True, trackers=[])
        cfg.attention_backend = backend
        method = _WanVelocity()
        result = train(method, [{"index": i} for i in range(2)], cfg, progress=False)
        losses[backend] = result.metrics["loss"]
        names = {getattr(b, "value", b) for b in _backends(method.transformer)}
        assert names == {"_native_math" if backend != "sdpa" else "native"}
    eps32 = torch.finfo(torch.float32).eps
    assert abs(losses["_native_math"] - losses["sdpa"]) <= 64 * eps32 * abs(losses["sdpa"])


def test_train_compile_compiles_each_block_and_keeps_the_losses(tmp_path) -> None:
    """train.compile reaches the loop: every Wan block is compiled (not the model) and two steps give
    the eager losses (the eager backend runs the traced ops unchanged: fp32 rounding only)."""
    torch._dynamo.reset()
    losses = {}
    for compiled in (True, False):
        cfg = TrainConfig(
            output_dir=tmp_path / str(compiled), max_steps=2, batch_size=2, cpu=True, trackers=[], log_every=1
        )
        cfg.compile, cfg.compile_backend = compiled, "eager"
        method = _WanVelocity()
        train(method, [{"index": i} for i in range(4)], cfg, progress=False)
        blocks = method.transformer.blocks
        assert all((b._compiled_call_impl is not None) == compiled for b in blocks)
        assert method.transformer._compiled_call_impl is None
        lines = (tmp_path / str(compiled) / "metrics.jsonl").read_text().splitlines()
        losses[compiled] = [json.loads(line)["loss"] for line in lines]
    eps32 = torch.finfo(torch.float32).eps
    for a, b in zip(losses[True], losses[False], strict=True):
        assert abs(a - b) <= 64 * eps32 * abs(b)
    torch._dynamo.reset()


def test_generate_refuses_an_unknown_backend_in_one_line(tmp_path) -> None:
    from typer.testing import CliRunner

    from flowalign.cli import app

    args = ["generate", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--prompt", "a"]
    result = CliRunner().invoke(app, [*args, "--attention-backend", "flashy"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--attention-backend: unknown attention backend 'flashy'" in lines[0]
