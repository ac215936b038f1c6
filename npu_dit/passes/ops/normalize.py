"""Arguments of a graph call by their schema names, whatever form the model wrote them in.

`torch.roll(x, 2, 1)`, `x.roll(2, 1)` and `torch.roll(x, shifts=2, dims=1)` all become
`{"input": x, "shifts": 2, "dims": 1}`; `torch.std(x, 1)` binds `dim` (not `unbiased`), the binary
`torch.max(a, b)` binds `other`. The schemas are PyTorch's own (`torch.fx.operator_schemas`: the
aten schemas of a builtin, with `self` named `input`; `inspect.signature` of a Python function), and
where a name has several overloads the one whose types match the arguments' recorded values is
taken, as the dispatcher would. Tensor methods bind against the aten op of the same name; varargs
sizes (`x.view(2, 3)`, `x.permute(0, 2, 1)`) are packed into the list the schema declares.

The matching signature is cached per (callable, argument types), so a graph of thousands of nodes
pays the overload resolution once per distinct call form.
"""

from __future__ import annotations

import inspect
import numbers
import operator
import types
import typing
from typing import Any

import torch
import torch.fx as fx
from torch.fx.operator_schemas import get_signature_for_torch_op, type_matches



def node_value(node: Any) -> Any:
    """The example value recorded for a node (plain values pass through); the same reading as
    `analysis.attention_ops.node_value`, here so the registry imports nothing from the analyses."""
    if isinstance(node, fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node

_SIGNATURES: dict[Any, list[tuple[inspect.Signature, Any]] | None] = {}
_CHOSEN: dict[tuple, int | None] = {}

# operator-module callables Dynamo writes for Python operators: (a, b) or (a,)
_BINARY = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.mod, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.and_, operator.or_, operator.xor, operator.matmul, operator.lshift, operator.rshift,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.ipow,
    operator.imod, operator.iand, operator.ior, operator.ixor,
}
_UNARY = {operator.neg, operator.pos, operator.invert, operator.abs, operator.not_}
_OPERATOR_SIGNATURES = {
    operator.getitem: inspect.Signature([inspect.Parameter("input", inspect.Parameter.POSITIONAL_ONLY),
                                         inspect.Parameter("index", inspect.Parameter.POSITIONAL_ONLY)]),
    operator.setitem: inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY)
                                         for n in ("input", "index", "value")]),
}
# `x.type(dtype)`: a Tensor method with no aten op of its name
_OPERATOR_SIGNATURES[torch.Tensor.type] = inspect.Signature(
    [inspect.Parameter("input", inspect.Parameter.POSITIONAL_ONLY)]
    + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
       for n, d in (("dtype", None), ("non_blocking", False))])
# `torch.einsum(equation, *operands)`: the aten schema takes the operands as one list
_OPERATOR_SIGNATURES[torch.einsum] = inspect.Signature(
    [inspect.Parameter("equation", inspect.Parameter.POSITIONAL_OR_KEYWORD),
     inspect.Parameter("operands", inspect.Parameter.VAR_POSITIONAL)])
_GET_DATA = getattr(torch._C._autograd, "_get_data_attr", None)  # `x.data` in a Dynamo graph: no schema
if _GET_DATA is not None:
    _OPERATOR_SIGNATURES[_GET_DATA] = inspect.Signature([inspect.Parameter("input", inspect.Parameter.POSITIONAL_ONLY)])


def resolve_target(node: fx.Node) -> Any:
    """The callable a call node runs: its target, or for a method call the `torch.Tensor` method."""
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        return getattr(torch.Tensor, node.target, None)
    return None


def _aten_packet(name: str) -> Any:
    try:
        return getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None


def _signatures(target: Any) -> list[tuple[inspect.Signature, Any]] | None:
    """[(signature, schema or None)] for a callable, every overload."""
    if target in _SIGNATURES:
        return _SIGNATURES[target]
    found: list[tuple[inspect.Signature, Any]] | None = None
    if target in _OPERATOR_SIGNATURES:
        found = [(_OPERATOR_SIGNATURES[target], None)]
    elif target in _BINARY:
        found = [(inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY)
                                     for n in ("input", "other")]), None)]
    elif target in _UNARY:
        found = [(inspect.Signature([inspect.Parameter("input", inspect.Parameter.POSITIONAL_ONLY)]), None)]
    else:
        candidates = [target]
        name = getattr(target, "__name__", None)
        if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            candidates = [target]
        elif getattr(target, "__objclass__", None) is torch._C.TensorBase or (
                getattr(torch.Tensor, name or "", None) is target):
            packet = _aten_packet(name) if name else None
            candidates = [packet] if packet is not None else []
        for candidate in candidates:
            try:
                sigs = get_signature_for_torch_op(candidate, return_schemas=True)
            except Exception:  # noqa: BLE001 - a callable torch has no schema for
                sigs = (None, None)
            if sigs and sigs[0]:
                found = list(zip(sigs[0], sigs[1]))
                break
        if found is None and callable(target):
            try:
                found = [(inspect.signature(target), None)]
            except (TypeError, ValueError):
                found = None
        if found is None and name in ("float", "half", "bfloat16", "double", "int", "long", "bool",
                                       "cpu", "cuda", "npu", "contiguous", "detach", "clone"):
            found = [(inspect.Signature([inspect.Parameter("input", inspect.Parameter.POSITIONAL_ONLY)],), None)]
    _SIGNATURES[target] = found
    return found


def _type_of(value: Any) -> Any:
    if isinstance(value, fx.Node):
        value = node_value(value)
    if isinstance(value, torch.Tensor):
        return torch.Tensor
    if isinstance(value, torch.SymInt):
        return int
    if isinstance(value, torch.SymFloat):
        return float
    if isinstance(value, torch.SymBool):
        return bool
    if isinstance(value, (list, tuple)):
        inner = {_type_of(v) for v in value}
        if not inner:
            return list[int]
        if inner <= {int}:
            return list[int]
        if inner <= {int, float}:
            return list[float]
        if inner <= {torch.Tensor}:
            return list[torch.Tensor]
        if inner <= {torch.Tensor, type(None)}:
            return list[typing.Optional[torch.Tensor]]
        return tuple
    return type(value)


def _matches(parameter: inspect.Parameter, arg_type: Any) -> bool:
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return True
    if arg_type is type(None) and parameter.default is None:
        return True
    return _type_ok(annotation, arg_type)


def _type_ok(annotation: Any, arg_type: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # Optional[T], `T | None`
        return any(_type_ok(arm, arg_type) for arm in typing.get_args(annotation))
    if arg_type is type(None):
        return annotation is type(None)
    if typing.get_origin(annotation) in (list, tuple, typing.List, typing.Tuple) and arg_type in (int, float, bool):
        arms = typing.get_args(annotation)  # a Python function's list parameter given one number
        return bool(arms) and _type_ok(arms[0], arg_type)
    if annotation is float and arg_type is int:
        return True
    if annotation is numbers.Number:
        return arg_type in (int, float, bool)
    if arg_type is bool and annotation is int:
        return False  # an int parameter does not take a bool (std(x, True) is `unbiased`)
    try:
        return bool(type_matches(annotation, arg_type))
    except Exception:  # noqa: BLE001
        return False


def _bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> inspect.BoundArguments | None:
    try:
        return signature.bind(*args, **kwargs)
    except TypeError:
        pass
    # varargs sizes: x.view(2, 3), x.permute(0, 2, 1), x.expand(B, -1, -1), torch.ones(B, S, dtype=...):
    # the sizes written one by one fill the list parameter they stand for
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    for i, parameter in enumerate(params):
        if i >= len(args):
            break
        if typing.get_origin(parameter.annotation) not in (list, typing.List):
            continue
        rest = args[i:]
        if len(rest) > 1 and all(_type_of(a) is int for a in rest):
            try:
                return signature.bind(*args[:i], tuple(rest), **kwargs)
            except TypeError:
                return None
    return None


def _types_ok(bound: inspect.BoundArguments, *, bool_as_float: bool = False) -> bool:
    """Whether every argument's type fits its parameter; with `bool_as_float`, a bool also fits a float
    parameter, as PyTorch's argument parser takes it (`F.pad(mask, (1, 0), value=True)`): tried only
    when no overload fits strictly, so an overload that takes the bool as a bool is chosen first."""
    for name, value in bound.arguments.items():
        parameter = bound.signature.parameters[name]
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL or parameter.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        arg_type = _type_of(value)
        if bool_as_float and arg_type is bool and _type_ok(parameter.annotation, float):
            continue
        if not _matches(parameter, arg_type):
            return False
    return True


class Normalized(typing.NamedTuple):
    target: Any
    args: dict[str, Any]  # every parameter by name, defaults filled in
    schema: Any  # the aten FunctionSchema of the chosen overload, when there is one


def normalize(node: fx.Node) -> Normalized | None:
    """The node's arguments by their schema names, or None when no signature of its callable binds."""
    target = resolve_target(node)
    if target is None:
        return None
    signatures = _signatures(target)
    if not signatures:
        return None
    key = (target, len(node.args), tuple(node.kwargs), tuple(_type_of(a) for a in node.args),
           tuple(_type_of(v) for v in node.kwargs.values()))
    chosen = _CHOSEN.get(key, -1)
    if chosen == -1:
        bindings = [_bind(signature, node.args, node.kwargs) for signature, _ in signatures]
        chosen = next((i for i, b in enumerate(bindings) if b is not None and _types_ok(b)), None)
        if chosen is None:
            chosen = next((i for i, b in enumerate(bindings) if b is not None and _types_ok(b, bool_as_float=True)), None)
        _CHOSEN[key] = chosen
    if chosen is None:
        return None
    signature, schema = signatures[chosen]
    bound = _bind(signature, node.args, node.kwargs)
    if bound is None:
        return None
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    return Normalized(target, arguments, schema)


def written_arguments(normalized: Normalized) -> tuple[str, ...]:
    """Arguments the chosen overload writes in place (`Tensor(a!) self`), from its schema."""
    schema = normalized.schema
    if schema is None:
        return ()
    names = []
    for argument in schema.arguments:
        info = argument.alias_info
        if info is not None and info.is_write and argument.name != "out":
            names.append("input" if argument.name == "self" else argument.name)
    return tuple(names)


def aliasing_output(normalized: Normalized) -> bool:
    """The chosen overload returns a view of an input (`Tensor(a) self -> Tensor(a)`)."""
    schema = normalized.schema
    if schema is None:
        return False
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


