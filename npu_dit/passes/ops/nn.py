"""Linear algebra, attention, convolution, padding and resampling.

Attention is one entry for SDPA and for the lowered kernels npu-dit emits (the torch_npu ops and
their CPU reference ops, `sdpa_on_backend`): every analysis sees a lowered call as attention
whatever this process compiled before."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from npu_dit.passes.ops.core import Call, Semantics, register, register_resolver


@register(F.linear, torch._C._nn.linear, torch.ops.aten.linear.default)
def linear(call: Call) -> Semantics:
    return Semantics("linear", call)


@register(torch.matmul, torch.Tensor.matmul, torch.bmm, torch.Tensor.bmm, torch.mm, torch.Tensor.mm, operator.matmul,
          torch.ops.aten.bmm.default, torch.ops.aten.mm.default)
def matmul(call: Call) -> Semantics:
    return Semantics("matmul", call)


@register(torch.einsum, torch.ops.aten.einsum.default)
def einsum(call: Call) -> Semantics | None:
    """`einsum(equation, *operands)`: `dims` holds nothing; the flows read the equation (`einsum_operands`)."""
    return Semantics("einsum", call) if einsum_operands(call) is not None else None


def einsum_operands(call: Call) -> tuple[str, list, str] | None:
    """(input subscripts per operand, operands, output subscripts) of an einsum call with an explicit
    `->` (ellipsis as '.'), or None for a form not read here."""
    # torch.einsum(equation, *operands) (or one list of them); aten.einsum(equation, tensors)
    equation, operands = call.args.get("equation"), list(call.args.get("operands", call.args.get("tensors")) or ())
    if len(operands or ()) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or "->" not in equation or not operands:
        return None
    lhs, out = equation.replace(" ", "").replace("...", ".").split("->")
    inputs = lhs.split(",")
    if len(inputs) != len(operands):
        return None
    return inputs, operands, out


@register(torch.outer, torch.Tensor.outer, torch.ger, torch.Tensor.ger)
def outer(call: Call) -> Semantics:
    return Semantics("outer", call)


def attention(call: Call) -> Semantics:
    return Semantics("attention", call, sizes=("head_num", "num_heads", "num_key_value_heads"))


register(F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
         torch.ops.aten.scaled_dot_product_attention.default)(attention)


def _lowered_attention(target: object) -> object:
    """The kernels the lowering emits (torch_npu's ops, their CPU reference ops, `sdpa_on_backend`)."""
    from npu_dit.passes.analysis.attention_ops import LOWERED_ATTENTION_TARGETS, ensure_lowered_targets

    ensure_lowered_targets()
    try:
        return attention if target in LOWERED_ATTENTION_TARGETS else None
    except TypeError:
        return None


register_resolver(_lowered_attention)


@register(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
          torch.ops.aten.convolution.default)
def conv(call: Call) -> Semantics:
    return Semantics("conv", call)


@register(F.pad, torch._C._nn.pad, torch.constant_pad_nd)
def pad(call: Call) -> Semantics:
    return Semantics("pad", call, sizes=("pad",))


@register(F.interpolate, torch._C._nn.upsample_nearest2d, torch._C._nn.upsample_nearest1d,
          torch._C._nn.upsample_nearest3d)
def interpolate(call: Call) -> Semantics:
    return Semantics("resample", call, sizes=("size",))


@register(F.embedding, torch.embedding)
def embedding(call: Call) -> Semantics:
    return Semantics("embedding", call)
