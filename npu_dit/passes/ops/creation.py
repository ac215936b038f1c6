"""Ops that make tensors from sizes (fresh dims), tensors shaped like another (its dims, fresh
values), sizes read off a tensor, arithmetic on sizes, and calls with effects only."""

from __future__ import annotations

import math
import operator

import torch

from npu_dit.passes.ops.core import Call, Semantics, dim_of, register

_SIZES = ("size", "end", "start", "step", "steps", "n", "m", "high", "low")

register(
    torch.arange, torch.ones, torch.zeros, torch.full, torch.empty, torch.randn, torch.rand, torch.randint,
    torch.tensor, torch.as_tensor, torch.linspace, torch.logspace, torch.eye, torch.scalar_tensor,
    torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full, torch.Tensor.new_empty,
    torch.Tensor.new_tensor, torch.empty_strided, torch.ops.aten.arange.default, torch.ops.aten.arange.start,
    torch.ops.aten.full.default, torch.ops.aten.zeros.default, torch.ops.aten.ones.default,
)(lambda call: Semantics("creation", call, sizes=_SIZES, meta_only=("input",)))

register(
    torch.ones_like, torch.zeros_like, torch.full_like, torch.empty_like, torch.rand_like, torch.randn_like,
    torch.randint_like,
)(lambda call: Semantics("like", call))


@register(torch.Tensor.size, torch.ops.aten.sym_size.int, torch.ops.aten.size.int)
def size(call: Call) -> Semantics:
    dim = call.args.get("dim")
    return Semantics("size", call, dim=None if dim is None else dim_of(call, dim))


@register(torch.Tensor.dim, torch.Tensor.numel, torch.numel, torch.Tensor.element_size, torch.ops.aten.sym_numel.default,
          torch.Tensor.is_contiguous, torch.is_floating_point, torch.Tensor.is_floating_point, torch.is_complex,
          torch.Tensor.is_complex, torch.Tensor.stride, torch.ops.aten.sym_stride.int, torch.Tensor.get_device,
          torch.Tensor.item, torch.Tensor.tolist)
def metadata(call: Call) -> Semantics:
    return Semantics("size", call)


register(
    torch.sym_max, torch.sym_min, torch.sym_sum, torch.sym_int, torch.sym_float, torch.sym_not, math.floor,
    math.ceil, math.sqrt, operator.truth, int, float, torch.Size,
)(lambda call: Semantics("symbolic", call))


@register(torch._assert, torch._C._set_grad_enabled, torch.autograd.grad_mode.set_grad_enabled,
          torch.manual_seed,
          torch._check, torch._check_is_size, torch.ops.aten._assert_scalar.default,
          torch.ops.aten.sym_constrain_range_for_size.default)
def effect(call: Call) -> Semantics:
    return Semantics("effect", call)
