"""Reductions (a dim removed or kept as 1) and shape-preserving ops that combine positions along
some dims (softmax, scans, flip, roll, sort, the normalisations): sharding one of those dims would
change the result. `dims=None` means every dim (`x.sum()`, `torch.roll(x, 3)`, which rolls the
flattened tensor)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from npu_dit.passes.ops.core import Call, Semantics, dim_of, dims_of, register


def _dim_name(call: Call) -> str | None:
    return next((n for n in ("dim", "dims", "axis") if n in call.args), None)


def _reduce(call: Call) -> Semantics:
    name = _dim_name(call)
    dims = dims_of(call, call.args.get(name)) if name else None
    keepdim = bool(call.args.get("keepdim") or False)
    return Semantics("reduce", call, dims=dims, keepdim=keepdim)


register(
    torch.sum, torch.Tensor.sum, torch.mean, torch.Tensor.mean, torch.amax, torch.Tensor.amax, torch.amin,
    torch.Tensor.amin, torch.max, torch.Tensor.max, torch.min, torch.Tensor.min, torch.any, torch.Tensor.any,
    torch.all, torch.Tensor.all, torch.std, torch.Tensor.std, torch.var, torch.Tensor.var, torch.prod,
    torch.Tensor.prod, torch.argmax, torch.Tensor.argmax, torch.argmin, torch.Tensor.argmin, torch.logsumexp,
    torch.Tensor.logsumexp, torch.norm, torch.Tensor.norm, torch.count_nonzero, torch.Tensor.count_nonzero,
    torch.std_mean, torch.var_mean, torch.median, torch.Tensor.median, torch.nansum, torch.Tensor.nansum,
    torch.nanmean, torch.Tensor.nanmean, torch.linalg.vector_norm, torch.aminmax, torch.Tensor.aminmax,
    torch.ops.aten.sum.dim_IntList, torch.ops.aten.mean.dim, torch.ops.aten.amax.default,
)(_reduce)


@register(torch.max, torch.Tensor.max, torch.min, torch.Tensor.min)
def max_min(call: Call) -> Semantics:
    if "other" in call.args:  # binary max(a, b): elementwise
        return Semantics("pointwise", call)
    return _reduce(call)


def _mix_along(call: Call) -> Semantics:
    name = _dim_name(call)
    dims = dims_of(call, call.args.get(name)) if name else None
    return Semantics("mix", call, dims=dims)


register(
    torch.softmax, torch.Tensor.softmax, F.softmax, torch.log_softmax, torch.Tensor.log_softmax, F.log_softmax,
    torch._softmax, torch.cumsum, torch.Tensor.cumsum, torch.cumprod, torch.Tensor.cumprod, torch.cummax,
    torch.Tensor.cummax, torch.cummin, torch.Tensor.cummin, torch.logcumsumexp, torch.Tensor.logcumsumexp,
    torch.flip, torch.Tensor.flip, torch.sort, torch.Tensor.sort, torch.argsort, torch.Tensor.argsort,
    torch.ops.aten._softmax.default, torch.ops.aten._log_softmax.default, F.softmin, torch.Tensor.cumsum_,
    torch.topk, torch.Tensor.topk, torch.kthvalue, torch.Tensor.kthvalue,
)(_mix_along)


@register(torch.roll, torch.Tensor.roll, torch.ops.aten.roll.default)
def roll(call: Call) -> Semantics:
    # no dims: the flattened tensor is rolled, which moves values across every dim
    return Semantics("mix", call, dims=dims_of(call, call.args.get("dims")))


@register(torch.fliplr, torch.Tensor.fliplr)
def fliplr(call: Call) -> Semantics:
    return Semantics("mix", call, dims=(1,))


@register(torch.flipud, torch.Tensor.flipud)
def flipud(call: Call) -> Semantics:
    return Semantics("mix", call, dims=(0,))


@register(F.layer_norm, torch.layer_norm, F.rms_norm, torch.rms_norm, torch.ops.aten.layer_norm.default,
          torch.ops.aten.rms_norm.default)
def layer_norm(call: Call) -> Semantics:
    shape = call.value("normalized_shape")
    count = len(shape) if isinstance(shape, (list, tuple)) else 1
    ndim = call.ndim()
    return Semantics("mix", call, dims=tuple(range(ndim - count, ndim)), sizes=("normalized_shape",))


@register(F.normalize)
def normalize(call: Call) -> Semantics:
    return Semantics("mix", call, dims=(dim_of(call, call.get("dim", 1)),))


@register(F.group_norm, torch.group_norm, F.local_response_norm, F.instance_norm, F.batch_norm)
def group_norm(call: Call) -> Semantics:
    ndim = call.ndim()
    return Semantics("mix", call, dims=tuple(range(1, ndim)) if call.target is not F.batch_norm else
                     tuple(d for d in range(ndim) if d != 1))
