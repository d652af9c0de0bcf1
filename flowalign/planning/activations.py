"""Activation memory of the real transformer blocks, derived from their structure.

What a block keeps for backward follows from two autograd rules applied to each op of the block:

* a linear layer saves its input only if its weight is trainable (the input is needed for the weight
  gradient alone); a product ``a * b`` saves ``a`` only if ``b`` needs a gradient, and vice versa;
* normalisations save their input and per-token statistics; attention (flash / memory-efficient
  kernels) saves q, k, v, the output and one fp32 log-sum-exp per head and token, never the N x N map.

Two regimes follow. **LoRA** (frozen base in the compute dtype, fp32 adapters, bf16 autocast): the
frozen linears save nothing, the adaLN gates need no gradient, and every adapted layer saves its own
bf16 copy of its input (peft casts the input to the adapter's fp32 dtype and autocast casts it back)
plus its rank-r down-projection. **Full** fine-tune (fp32 master weights, bf16 autocast): every linear
saves its bf16 input, every gated product saves both operands, and autocast keeps a bf16 copy of each
weight it casts until backward. ``lora_rank=0`` is the frozen network without adapters (a frozen teacher
differentiated with respect to its input).

Counts are bytes per token of one block, per stream, in terms of the width d, MLP width m, heads h and
LoRA rank r (each term names the tensors it stands for). ``tests/planning/test_activations.py`` checks
every formula against the bytes autograd actually saves (``flowalign.planning.trace``) in shrunk real
diffusers blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowalign.planning.architectures import Architecture

BF16 = 2
FP32 = 4


@dataclass(frozen=True)
class BlockShape:
    """Widths of one block: model width d, MLP width m, heads h."""

    d: int
    m: int
    h: int
    head_dim: int


def block_shape(arch: Architecture) -> BlockShape:
    t = arch.transformer
    d = arch.hidden
    m = int(d * t["mlp_ratio"]) if "mlp_ratio" in t else t.get("ffn_dim", 4 * d)
    return BlockShape(d=d, m=m, h=t["num_attention_heads"], head_dim=t["attention_head_dim"])


def _attention_core(s: BlockShape) -> int:
    """Per attended token: q, k, v and the output in bf16, plus the fp32 log-sum-exp per head."""
    return 4 * s.d * BF16 + s.h * FP32


def sd3_block(s: BlockShape, *, lora_rank: int | None, dual: bool) -> tuple[int, int]:
    """(bytes per image token, bytes per text token) of an SD3 ``JointTransformerBlock``.

    Per stream: adaLN LayerNorm and the MLP's LayerNorm (bf16 mean and rstd each), q/k RMSNorm (fp32
    copies of q and k, one fp32 statistic per head each), joint attention over image + text tokens,
    GELU MLP.
    LoRA (adapters on the image stream's to_q, to_k, to_v, to_out; the text stream has none): 3 bf16
    d-tensors of the block (LayerNorm input, attention-output residual input, MLP LayerNorm input), 4
    adapter input copies with their rank-r projections, the GELU input (the frozen fc2 keeps nothing).
    Full: 10 bf16 d-tensors (linear inputs and gate operands), 4 fp32 d-tensors (RMSNorm inputs and
    outputs), both MLP hiddens (fc1 output for GELU, GELU output for fc2).
    A dual-attention block (SD3.5-M's MMDiT-X) adds a second self-attention over the image tokens:
    its core plus, with LoRA, 2 bf16 d-tensors, 4 adapter copies and the q/k RMSNorm; in a full
    fine-tune 5 bf16 and 4 fp32 d-tensors and the RMSNorm statistics.
    """
    d, m, h = s.d, s.m, s.h
    stats = 2 * 2 * BF16
    qk = 2 * d * FP32 + 2 * h * FP32
    core = _attention_core(s)
    if lora_rank is not None:
        adapters = 4 * (d + lora_rank) * BF16 if lora_rank else 0
        img = 3 * d * BF16 + adapters + qk + m * BF16 + stats + core
        txt = 3 * d * BF16 + qk + m * BF16 + stats + core
        if dual:
            img += 2 * d * BF16 + adapters + qk + core
        return img, txt
    img = txt = 10 * d * BF16 + 4 * d * FP32 + 2 * h * FP32 + 2 * m * BF16 + stats + core
    if dual:
        img += 5 * d * BF16 + 4 * d * FP32 + 2 * h * FP32 + core
    return img, txt


def flux_double_block(s: BlockShape, *, lora_rank: int | None) -> tuple[int, int]:
    """(bytes per image token, bytes per text token) of a FLUX ``FluxTransformerBlock``.

    SD3's joint block with rotary embedding on q and k: the rotated q and k are what attention keeps,
    so of the block's own d-tensors only the LayerNorm input remains with LoRA (1 instead of 3); a
    full fine-tune keeps 8 bf16 d-tensors. The rotary tables are counted by :func:`rope_bytes`.
    """
    d, m, h = s.d, s.m, s.h
    stats = 2 * 2 * BF16
    qk = 2 * d * FP32 + 2 * h * FP32
    core = _attention_core(s)
    if lora_rank is not None:
        adapters = 4 * (d + lora_rank) * BF16 if lora_rank else 0
        img = d * BF16 + adapters + qk + m * BF16 + stats + core
        txt = d * BF16 + qk + m * BF16 + stats + core
        return img, txt
    img = txt = 8 * d * BF16 + 4 * d * FP32 + 2 * h * FP32 + 2 * m * BF16 + stats + core
    return img, txt


def flux_single_block(s: BlockShape, *, lora_rank: int | None) -> int:
    """Bytes per (image + text) token of a FLUX ``FluxSingleTransformerBlock``.

    One adaLN LayerNorm, attention and MLP in parallel from the same normalised input, q/k RMSNorm and
    rotary, then one output projection of the concatenated [attention, MLP]. LoRA adapts to_q, to_k,
    to_v (this block has no to_out): 4 bf16 d-tensors besides the core (LayerNorm input, 3 adapter
    copies), 3 rank-r projections, the GELU input. Full: 4 bf16 + 4 fp32 d-tensors, the GELU input,
    and the (d + m)-wide input of the output projection.
    """
    d, m, h = s.d, s.m, s.h
    stats = 2 * BF16
    qk = 2 * d * FP32 + 2 * h * FP32
    core = _attention_core(s)
    if lora_rank is not None:
        adapters = 3 * (d + lora_rank) * BF16 if lora_rank else 0
        return d * BF16 + adapters + qk + m * BF16 + stats + core
    return 4 * d * BF16 + 4 * d * FP32 + 2 * h * FP32 + (d + m) * BF16 + m * BF16 + stats + core


def qwen_image_block(s: BlockShape, *, lora_rank: int | None) -> tuple[int, int]:
    """(bytes per image token, bytes per text token) of a ``QwenImageTransformerBlock``.

    FLUX.1's double block (:func:`flux_double_block`: the same streams, LayerNorms, q/k RMSNorm, joint
    attention and 4d GELU MLP) plus, per token of either stream, q and k after their RMSNorm in bf16
    (2 d-tensors), which the complex rotary multiplication keeps. The rotary table is one complex tensor
    built once per forward and kept by reference, so no block adds its own (:func:`rope_bytes` is 0).
    """
    img, txt = flux_double_block(s, lora_rank=lora_rank)
    return img + 2 * s.d * BF16, txt + 2 * s.d * BF16


def flux2_double_block(s: BlockShape, *, lora_rank: int | None) -> tuple[int, int]:
    """(bytes per image token, bytes per text token) of a FLUX.2 ``Flux2TransformerBlock``.

    FLUX.1's double block (:func:`flux_double_block`) with a SwiGLU MLP of hidden width m (= mlp_ratio d)
    and no biases: the MLP keeps its input projection's 2m-wide output and the m-wide SiLU output (3m
    bf16, frozen or not); a full fine-tune also keeps the gate product that feeds the output projection
    (4m in all), 4 bf16 d-tensors of the block besides the attention core (not FLUX.1's 8) and 4 fp32
    ones (the q/k RMSNorm inputs and outputs).
    """
    d, m, h = s.d, s.m, s.h
    stats = 2 * 2 * BF16
    qk = 2 * d * FP32 + 2 * h * FP32
    core = _attention_core(s)
    if lora_rank is not None:
        adapters = 4 * (d + lora_rank) * BF16 if lora_rank else 0
        img = d * BF16 + adapters + qk + 3 * m * BF16 + stats + core
        txt = d * BF16 + qk + 3 * m * BF16 + stats + core
        return img, txt
    img = txt = 4 * d * BF16 + qk + 2 * d * FP32 + 4 * m * BF16 + stats + core
    return img, txt


def flux2_single_block(s: BlockShape, *, lora_rank: int | None) -> int:
    """Bytes per (image + text) token of a FLUX.2 ``Flux2SingleTransformerBlock``.

    One fused projection gives q, k, v and the SwiGLU input (3d + 2m wide, kept whole: v and the MLP
    input are views of it), then one output projection of [attention, MLP] (d + m wide). flowalign's
    default FLUX.2 LoRA targets do not reach these blocks, so with LoRA they are frozen: the fused output,
    the SiLU output (m), the q/k RMSNorm inputs in fp32, the rotated q and k and the attention output in
    bf16. Full: also the output projection's input, the normalised block input and fp32 RMSNorm outputs.
    """
    d, m, h = s.d, s.m, s.h
    stats = 2 * BF16
    fused = (3 * d + 2 * m) * BF16 + m * BF16 + 3 * h * FP32 + stats
    if lora_rank is not None:
        return fused + 2 * d * FP32 + 3 * d * BF16
    return fused + (d + m) * BF16 + 4 * d * FP32 + 4 * d * BF16


def wan_block(s: BlockShape, *, lora_rank: int | None) -> tuple[int, int]:
    """(bytes per video token, bytes per text token) of a Wan ``WanTransformerBlock``.

    Wan runs its LayerNorms and modulation in fp32. Per video token: self-attention (q/k RMSNorm
    across heads, rotary) and the queries and output of cross-attention, each with an fp32
    log-sum-exp per head, a GELU MLP of width ``ffn_dim``, 9 fp32 per-token statistics. The text
    tokens enter every block's cross-attention as keys and values.
    LoRA (to_q, to_k, to_v, to_out of both attentions): per video token 12 bf16 and 6 fp32
    d-tensors, 6 rank-r projections, the GELU input; per text token 4 bf16 d-tensors (k, v and the
    adapter copies of their input), 1 fp32 d-tensor, 2 rank-r projections.
    Full: per video token 10 bf16 and 12 fp32 d-tensors and both MLP hiddens; per text token 2 bf16
    and 2 fp32 d-tensors.
    """
    d, m, h = s.d, s.m, s.h
    lse = 2 * h * FP32
    if lora_rank is not None:
        r = lora_rank
        img = 6 * d * BF16 + (6 * (d + r) * BF16 if r else 0) + 6 * d * FP32 + m * BF16 + lse + 9 * FP32
        txt = 2 * d * BF16 + (2 * (d + r) * BF16 if r else 0) + d * FP32 + FP32
        return img, txt
    img = 10 * d * BF16 + 12 * d * FP32 + 2 * m * BF16 + lse + 9 * FP32
    txt = 2 * d * BF16 + 2 * d * FP32 + FP32
    return img, txt


def rope_bytes(arch: Architecture, s: BlockShape) -> int:
    """Bytes per token position (shared by the batch) of the rotary cos/sin tables one block keeps."""
    if arch.family in (
        "flux",
        "flux2",
        "wan",
    ):  # cos and sin, head_dim wide (Wan reads strided halves of them)
        return 2 * s.head_dim * FP32
    return 0


def working_set(s: BlockShape, tokens: int) -> int:
    """Bytes alive besides the saved activations while one block runs backward (or a no-grad forward),
    for ``tokens`` tokens in all: the larger of the MLP's backward (the gradients of both hiddens, m wide,
    and of its input and output, d wide, in bf16) and attention's backward (gradients of q, k, v and the
    output in bf16 plus an fp32 accumulator for the query gradient)."""
    mlp = 2 * s.m * BF16 + 2 * s.d * BF16
    attention = 4 * s.d * BF16 + s.d * FP32
    return tokens * max(mlp, attention)


@dataclass(frozen=True)
class TransformerActivations:
    """Activation bytes of one forward with gradient through the whole transformer."""

    saved: int
    """Kept for backward by all blocks (with checkpointing: the block inputs, plus one block rebuilt)."""
    working: int
    """Transient bytes of one block's backward (:func:`working_set`)."""


def transformer_activations(
    arch: Architecture,
    image_tokens: int,
    text_tokens: int,
    samples: int,
    *,
    lora_rank: int | None,
    checkpointing: bool,
    depth: int | None = None,
) -> TransformerActivations:
    """Saved activations of ``samples`` samples through the first ``depth`` blocks (default: all).

    With gradient checkpointing each block keeps only its inputs (image and text hidden states in
    bf16) and backward rebuilds one block at a time, so ``saved`` = the inputs of every block + the
    largest block's activations.
    """
    if arch.name.startswith("qwen-image-edit"):
        raise ValueError(
            f"{arch.name}: the activation memory of the edit models is not modelled yet: the condition "
            "image's tokens join the transformer's sequence, which the planner does not count"
        )
    if arch.family not in ("sd3", "flux", "flux2", "qwen-image", "wan"):
        raise ValueError(
            f"{arch.name}: the activation memory of {arch.family} blocks is not modelled yet (its weights, "
            "LoRA and optimizer sizes are known: flowalign.planning.architectures.param_count)"
        )
    s = block_shape(arch)
    t = arch.transformer
    per_block: list[int] = []
    joint = image_tokens + text_tokens
    rope = rope_bytes(arch, s) * (joint if arch.family in ("flux", "flux2") else image_tokens)
    if arch.family == "sd3":
        dual = set(t.get("dual_attention_layers") or ())
        for i in range(t["num_layers"]):
            img, txt = sd3_block(s, lora_rank=lora_rank, dual=i in dual)
            per_block.append(samples * (img * image_tokens + txt * text_tokens))
    elif arch.family == "flux":
        img, txt = flux_double_block(s, lora_rank=lora_rank)
        per_block += [samples * (img * image_tokens + txt * text_tokens) + rope] * t["num_layers"]
        single = flux_single_block(s, lora_rank=lora_rank)
        per_block += [samples * single * joint + rope] * t["num_single_layers"]
    elif arch.family == "qwen-image":
        img, txt = qwen_image_block(s, lora_rank=lora_rank)
        per_block += [samples * (img * image_tokens + txt * text_tokens)] * t["num_layers"]
    elif arch.family == "flux2":
        img, txt = flux2_double_block(s, lora_rank=lora_rank)
        per_block += [samples * (img * image_tokens + txt * text_tokens) + rope] * t["num_layers"]
        single = flux2_single_block(s, lora_rank=lora_rank)
        per_block += [samples * single * joint + rope] * t["num_single_layers"]
    else:
        img, txt = wan_block(s, lora_rank=lora_rank)
        per_block += [samples * (img * image_tokens + txt * text_tokens) + rope] * t["num_layers"]
    if depth is not None:
        per_block = per_block[:depth]
    largest = max(per_block)
    working = working_set(s, samples * joint)
    head = samples * image_tokens * s.d * 2 * BF16  # final adaLN norm input and output
    if checkpointing:
        # Wan's text states are one tensor shared by all blocks; SD3/FLUX update both streams per block
        kept = image_tokens if arch.family == "wan" else joint
        inputs = samples * kept * s.d * BF16 * len(per_block)
        return TransformerActivations(saved=inputs + largest + head, working=working)
    return TransformerActivations(saved=sum(per_block) + head, working=working)
