"""Elementwise ops: the output broadcasts the tensor operands; nothing is mixed along any dim.

Found by a property, not a list: a torch function, `torch.Tensor` method or `torch.special` /
`torch.nn.functional` builtin whose ATen op carries `torch.Tag.pointwise` (add, silu, rsqrt,
where, masked_fill, ...), including the in-place variants (`add_`: mutates `input`). Python-level
activations and elementwise ops without the tag are listed here by callable."""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
import torch.nn.functional as F

from npu_dit.passes.ops.core import Call, Semantics, register, register_resolver

_NAMESPACES = (torch, torch.Tensor, torch.special, torch.nn.functional, torch._C._nn, torch._C._special)


def pointwise(call: Call) -> Semantics:
    inplace = call.args.get("inplace") is True
    return Semantics("pointwise", call, mutates=("input",) if inplace else ())


@functools.lru_cache(maxsize=None)
def _aten_pointwise(name: str) -> bool:
    try:
        packet = getattr(torch.ops.aten, name)
        return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())
    except (AttributeError, RuntimeError):
        return False


def _resolve(target: Any) -> Any:
    name = getattr(target, "__name__", None)
    if not isinstance(name, str):
        return None
    if isinstance(target, torch._ops.OpOverload):
        return pointwise if torch.Tag.pointwise in target.tags else None
    if not any(getattr(ns, name, None) is target for ns in _NAMESPACES):
        return None
    return pointwise if _aten_pointwise(name) else None


register_resolver(_resolve)

# elementwise without the ATen tag (or Python wrappers of tagged builtins)
register(
    F.silu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.sigmoid, F.tanh, F.logsigmoid, F.softsign, F.tanhshrink,
    F.dropout, F.alpha_dropout, F.feature_alpha_dropout, torch.dropout, torch.Tensor.masked_fill_,
    torch.nn.functional.threshold, torch.Tensor.clamp_, torch.Tensor.copy_, torch.Tensor.fill_,
    torch.Tensor.zero_, torch.Tensor.uniform_, torch.Tensor.normal_,
)(pointwise)


def _operator(call: Call) -> Semantics:
    if any(isinstance(call.value(n), torch.Tensor) for n in ("input", "other") if n in call.args):
        return Semantics("pointwise", call)
    return Semantics("symbolic", call)


def _operator_inplace(call: Call) -> Semantics:
    result = _operator(call)
    if result.kind == "pointwise" and isinstance(call.value("input"), torch.Tensor):
        return Semantics("pointwise", call, mutates=("input",))
    return result


register(
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.mod, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.and_, operator.or_, operator.xor, operator.neg, operator.pos, operator.invert,
    operator.abs, operator.lshift, operator.rshift, operator.not_,
)(_operator)
register(
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.ipow,
    operator.imod, operator.iand, operator.ior, operator.ixor,
)(_operator_inplace)
