"""The activation formulas against the bytes autograd saves in shrunk real diffusers blocks.

Each block is built at a width unlike any published one (d = 192, 3 heads, a Wan MLP of 520) in bf16,
with LoRA (rank 4, fp32 adapters) or as a full fp32 fine-tune, and run under bf16 autocast at two token
counts per stream. The difference of the traced bytes must equal the difference the formula predicts,
byte for byte: terms that do not grow with the tokens (adaLN vectors, cast adapter weights) cancel.
"""

from __future__ import annotations

import pytest
import torch

from flowalign.planning import activations as act
from flowalign.planning.trace import saved_bytes

D, HEADS, HEAD_DIM, WAN_FFN, RANK, BATCH = 192, 3, 64, 520, 4, 2
SHAPE = act.BlockShape(d=D, m=4 * D, h=HEADS, head_dim=HEAD_DIM)


def _prepare(block: torch.nn.Module, lora: bool) -> torch.nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    block = block.to(torch.bfloat16)
    if not lora:
        return block.float()
    block.requires_grad_(False)
    cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    block = inject_adapter_in_model(cfg, block)
    for name, p in block.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return block


def _block(kind: str, lora: bool):
    """(block, kwargs builder (image tokens, text tokens) -> forward kwargs)."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2SingleTransformerBlock,
        Flux2TransformerBlock,
    )
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    torch.manual_seed(0)
    if kind in ("sd3", "sd3-dual"):
        block = JointTransformerBlock(
            dim=D, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, context_pre_only=False,
            qk_norm="rms_norm", use_dual_attention=kind == "sd3-dual",
        )  # fmt: skip
    elif kind == "flux-double":
        block = FluxTransformerBlock(dim=D, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)
    elif kind == "flux-single":
        block = FluxSingleTransformerBlock(dim=D, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)
    elif kind == "flux2-double":
        block = Flux2TransformerBlock(dim=D, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)
    elif kind == "qwen-image":
        block = QwenImageTransformerBlock(dim=D, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)
    elif kind == "flux2-single":
        block = Flux2SingleTransformerBlock(dim=D, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)
    else:
        block = WanTransformerBlock(
            dim=D, ffn_dim=WAN_FFN, num_heads=HEADS, qk_norm="rms_norm_across_heads",
            cross_attn_norm=True, eps=1e-6,
        )  # fmt: skip
    if kind == "flux2-single" and lora:  # flowalign's default FLUX.2 LoRA targets do not reach these: frozen
        block = block.to(torch.bfloat16).requires_grad_(False)
    else:
        block = _prepare(block, lora)

    def kwargs(n: int, t: int) -> dict:
        x = torch.randn(BATCH, n, D, dtype=torch.bfloat16, requires_grad=True)
        c = torch.randn(BATCH, t, D, dtype=torch.bfloat16, requires_grad=True)
        if kind == "wan":
            rope = (torch.randn(1, n, 1, HEAD_DIM), torch.randn(1, n, 1, HEAD_DIM))
            temb = torch.randn(BATCH, 6, D, dtype=torch.bfloat16)
            return dict(hidden_states=x, encoder_hidden_states=c, temb=temb, rotary_emb=rope)
        if kind == "flux2-double":  # FLUX.2's blocks read shared modulation: 2 sets of (shift, scale, gate)
            mod = dict(temb_mod_img=torch.randn(BATCH, 6 * D, dtype=torch.bfloat16))
            mod["temb_mod_txt"] = torch.randn(BATCH, 6 * D, dtype=torch.bfloat16)
            rope = (torch.randn(n + t, HEAD_DIM), torch.randn(n + t, HEAD_DIM))
            return dict(hidden_states=x, encoder_hidden_states=c, image_rotary_emb=rope, **mod)
        if kind == "flux2-single":  # the text and image tokens arrive concatenated
            joint = torch.cat([c, x], dim=1).detach().requires_grad_(True)
            rope = (torch.randn(n + t, HEAD_DIM), torch.randn(n + t, HEAD_DIM))
            temb = torch.randn(BATCH, 3 * D, dtype=torch.bfloat16)
            return dict(hidden_states=joint, encoder_hidden_states=None, temb_mod=temb, image_rotary_emb=rope)
        temb = torch.randn(BATCH, D, dtype=torch.bfloat16)
        kw = dict(hidden_states=x, encoder_hidden_states=c, temb=temb)
        if kind == "qwen-image":  # complex rotary tables, one per stream
            freqs = [torch.polar(torch.ones(k, HEAD_DIM // 2), torch.randn(k, HEAD_DIM // 2)) for k in (n, t)]
            return dict(kw, encoder_hidden_states_mask=None, image_rotary_emb=tuple(freqs))
        if kind.startswith("flux"):
            kw["image_rotary_emb"] = (torch.randn(n + t, HEAD_DIM), torch.randn(n + t, HEAD_DIM))
        return kw

    return block, kwargs


def _traced(block, kwargs: dict) -> int:
    inputs = [v for v in (kwargs["hidden_states"], kwargs["encoder_hidden_states"]) if v is not None]
    # Qwen-Image's complex rotary table is built once per forward and shared by every block
    inputs += [f for f in kwargs.get("image_rotary_emb") or () if f.is_complex()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        n, _ = saved_bytes(lambda: block(**kwargs), [block], inputs)
    return n


def _predicted(kind: str, lora: bool, n: int, t: int) -> int:
    rank = RANK if lora else None
    if kind == "wan":
        shape = act.BlockShape(d=D, m=WAN_FFN, h=HEADS, head_dim=HEAD_DIM)
        img, txt = act.wan_block(shape, lora_rank=rank)
        return BATCH * (img * n + txt * t) + 2 * HEAD_DIM * 4 * n
    if kind == "flux-single":
        rope = 2 * HEAD_DIM * 4 * (n + t)
        return BATCH * act.flux_single_block(SHAPE, lora_rank=rank) * (n + t) + rope
    if kind == "qwen-image":
        img, txt = act.qwen_image_block(SHAPE, lora_rank=rank)
        return BATCH * (img * n + txt * t)
    if kind == "flux2-single":
        shape = act.BlockShape(d=D, m=3 * D, h=HEADS, head_dim=HEAD_DIM)
        return BATCH * act.flux2_single_block(shape, lora_rank=rank) * (n + t) + 2 * HEAD_DIM * 4 * (n + t)
    if kind == "flux2-double":
        shape = act.BlockShape(d=D, m=3 * D, h=HEADS, head_dim=HEAD_DIM)
        img, txt = act.flux2_double_block(shape, lora_rank=rank)
        return BATCH * (img * n + txt * t) + 2 * HEAD_DIM * 4 * (n + t)
    if kind == "flux-double":
        img, txt = act.flux_double_block(SHAPE, lora_rank=rank)
        return BATCH * (img * n + txt * t) + 2 * HEAD_DIM * 4 * (n + t)
    img, txt = act.sd3_block(SHAPE, lora_rank=rank, dual=kind == "sd3-dual")
    return BATCH * (img * n + txt * t)


KINDS = ["sd3", "sd3-dual", "flux-double", "flux-single", "flux2-double", "flux2-single", "qwen-image", "wan"]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("kind", KINDS)
def test_block_formula_matches_autograd(kind: str, lora: bool) -> None:
    block, kwargs = _block(kind, lora)
    for (n1, t1), (n2, t2) in (((32, 8), (96, 8)), ((32, 8), (32, 40))):
        traced = _traced(block, kwargs(n2, t2)) - _traced(block, kwargs(n1, t1))
        predicted = _predicted(kind, lora, n2, t2) - _predicted(kind, lora, n1, t1)
        assert traced == predicted, (kind, lora, (n1, t1), (n2, t2), traced, predicted)
