"""The op-semantics registry: what each op does to the dims of its operands.

One entry per callable (a torch function, a `torch.Tensor` method, an `operator` function, an ATen
OpOverload or npu-dit's own graph calls), never a name string. An entry is a function of the call,
its arguments already bound to their schema names (`normalize.py`), returning `Semantics`:

- `kind`: the family whose dim rule applies — `pointwise` (broadcast of the tensor operands),
  `same` (the output has the dims of `input`), `permute` (`order`), `reshape`, `expand`, `cat`,
  `stack`, `split`, `unbind`, `getitem`, `narrow`, `select`, `reduce` (`dims`, `keepdim`), `mix`
  (shape kept, positions along `dims` combined: softmax, cumsum, roll, norms), `linear`, `matmul`,
  `attention`, `conv`, `creation` (fresh dims), `like` (the dims of `input`, values fresh),
  `repeat` (tiles: a dim repeated once kept), `repeat_interleave`, `size` (a size read off `input` at
  `dim`), `symbolic` (arithmetic on sizes),
  `effect` (returns nothing, changes no tensor it reads: asserts, grad mode);
- `mutates`: the arguments it writes in place (`x.add_(y)`, `x[i] = v`, `inplace=True`);
- `meta_only`: tensor arguments read only for their dtype / device (`type_as`'s `other`);
- `sizes`: arguments that are sizes (a shape, a length), as opposed to values;
- `aliases`: the output is a view of `input`.

The token (Ulysses), feature (tensor parallel) and row (spatial) flows are transfer functions over
these kinds. An op without an entry, or whose arguments bind to no schema, has no semantics: every
flow treats it as opaque and a pass that would need a sharded dim through it refuses.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import torch
import torch.fx as fx

from npu_dit.passes.ops.normalize import Normalized, node_value, normalize, resolve_target, written_arguments


@dataclasses.dataclass(frozen=True)
class Call:
    """A graph call with its arguments by schema name."""

    node: fx.Node
    target: Any
    args: dict[str, Any]
    schema: Any = None

    def __getitem__(self, name: str) -> Any:
        return self.args[name]

    def get(self, name: str, default: Any = None) -> Any:
        value = self.args.get(name, default)
        return default if value is None else value

    def value(self, name: str) -> Any:
        return node_value(self.args.get(name))

    def ndim(self, name: str = "input") -> int:
        value = self.value(name)
        return value.dim() if isinstance(value, torch.Tensor) else 0

    def out_ndim(self) -> int:
        value = node_value(self.node)
        return value.dim() if isinstance(value, torch.Tensor) else 0


@dataclasses.dataclass(frozen=True)
class Semantics:
    kind: str
    call: Call
    dims: tuple[int, ...] | None = None  # reduce / mix: the dims (non-negative), None = all; permute: order
    keepdim: bool = False
    dim: int | None = None  # cat / stack / split / unbind / narrow / select / size: the dim (non-negative)
    mutates: tuple[str, ...] = ()
    meta_only: tuple[str, ...] = ()
    sizes: tuple[str, ...] = ()
    aliases: bool = False

    @property
    def node(self) -> fx.Node:
        return self.call.node

    def tensor_inputs(self) -> list[fx.Node]:
        """Tensor operands whose values flow into the output (meta-only ones excluded)."""
        found = []
        for name, arg in self.call.args.items():
            if name in self.meta_only:
                continue
            for item in arg if isinstance(arg, (list, tuple)) else [arg]:
                if isinstance(item, fx.Node) and isinstance(node_value(item), torch.Tensor):
                    found.append(item)
        return found

    def size_arguments(self) -> set[fx.Node]:
        """Nodes passed in a size position (a shape entry, a length): not used as values."""
        found: set[fx.Node] = set()
        for name in self.sizes:
            fx.node.map_arg(self.call.args.get(name), lambda n: found.add(n))  # into tuples and slices
        return found


Rule = Callable[[Call], "Semantics | None"]
_REGISTRY: dict[Any, Rule] = {}
_RESOLVERS: list[Callable[[Any], "Rule | None"]] = []


def register(*targets: Any) -> Callable[[Rule], Rule]:
    """Register `rule` for every callable in `targets` (None entries, absent in this torch, skipped)."""

    def wrap(rule: Rule) -> Rule:
        for target in targets:
            if target is not None:
                _REGISTRY[target] = rule
        return rule

    return wrap


def register_resolver(resolver: Callable[[Any], "Rule | None"]) -> None:
    """A family registered by a property of the callable (ATen's `pointwise` tag) instead of a list;
    what it finds is entered in the registry under the callable itself."""
    _RESOLVERS.append(resolver)


def rule_for(target: Any) -> Rule | None:
    try:
        rule = _REGISTRY.get(target)
    except TypeError:  # an unhashable target
        return None
    if rule is None and target not in _REGISTRY:
        for resolver in _RESOLVERS:
            rule = resolver(target)
            if rule is not None:
                break
        _REGISTRY[target] = rule  # type: ignore[assignment]
    return rule


def semantics(node: fx.Node) -> Semantics | None:
    """What `node` does to dims, or None (no entry, or arguments that bind to no schema).

    Cached per node while its arguments stay the same objects (a rewired node is looked up again)."""
    cached = _CACHE.get(node)
    if cached is not None and cached[0] is node.args and cached[1] is node.kwargs:
        return cached[2]
    result = _semantics(node)
    _CACHE[node] = (node.args, node.kwargs, result)
    return result


_CACHE: "weakref.WeakKeyDictionary[fx.Node, tuple]" = weakref.WeakKeyDictionary()


def _semantics(node: fx.Node) -> Semantics | None:
    if node.op not in ("call_function", "call_method"):
        return None
    target = resolve_target(node)
    rule = rule_for(target)
    if rule is None:
        return None
    normalized = normalize(node)
    if normalized is None:
        return None
    call = Call(node, target, normalized.args, normalized.schema)
    result = rule(call)
    if result is None:
        return None
    written = written_arguments(normalized)
    if written and not result.mutates:
        result = dataclasses.replace(result, mutates=written)
    return result


def dim_of(call: Call, value: Any, name: str = "input") -> int:
    """A dim argument made non-negative against `name`'s rank."""
    ndim = call.ndim(name)
    value = int(node_value(value))
    return value + ndim if value < 0 else value


def dims_of(call: Call, value: Any, name: str = "input") -> tuple[int, ...] | None:
    """A dim or list of dims (None or [] = every dim) made non-negative."""
    value = node_value(value)
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        return tuple(sorted({dim_of(call, v, name) for v in value}))
    return (dim_of(call, value, name),)


__all__ = ["Call", "Semantics", "register", "register_resolver", "rule_for", "semantics", "dim_of", "dims_of",
           "Normalized"]
