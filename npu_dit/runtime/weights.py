"""Tensor-parallel weights: each rank keeps only its shards, and may release the full parameters.

The executor of a tensor-parallel graph feeds this rank's shard of every sharded parameter in place
of the parameter Dynamo passes in. Shards are cut once, on the first call, and kept here keyed by
the parameter object (weakly), so a recompiled graph finds them again. With `release_weights=True`
(the default) the full parameters are then released the way FSDP frees them,
`param.untyped_storage().resize_(0)`: shape, stride and dtype stay, so Dynamo's guards (metadata,
not storage) still pass and nothing recompiles, but the module can no longer run without the
compiled program. Pass `options={"release_weights": False}` to keep the full weights (memory is
then not saved).

A tensor with no storage behind it crashes the process when an op reads it (SIGSEGV: kernels do not
check). So the owning module's attribute is shadowed by a `ReleasedParameter` in its instance
`__dict__` (which Dynamo does not guard: nothing recompiles): `module.weight` keeps its shape, dtype
and device, and any use of its values (`.sum()`, `torch.*`, the module's eager forward) raises a
RuntimeError naming `release_weights=False`; `state_dict()` raises the same. While Dynamo traces a
frame of an npu_dit-compiled call (a recompile) the stand-ins are taken out, so it sees the
parameters themselves (`compile_events`). The paths that reach the parameters without the attribute
are covered the same way, on the owning modules and every module above them: `named_parameters()`
(hence `parameters()`) yields the stand-ins, and `_apply` (hence `.to()`, `.half()`, `.cuda()`, ...)
raises before it copies anything. Only `module._parameters[...]` (private) still holds the emptied
tensor itself.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from npu_dit import compile_events

from npu_dit.plans import TensorParallelPlan, WeightShard, feature_blocks

_SHARDS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> {(dim, segs, world, rank): shard}
_RELEASED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> True once its storage is freed


def cut_shard(full: torch.Tensor, shard: WeightShard, world: int, rank: int) -> torch.Tensor:
    pieces = [full.narrow(shard.dim, start, length) for start, length in feature_blocks(shard.segs, world, rank)]
    return torch.cat(pieces, shard.dim).detach().clone() if len(pieces) > 1 else pieces[0].detach().clone()


def is_released(param: torch.Tensor) -> bool:
    return param in _RELEASED


class WeightFeeder:
    """Replaces the sharded parameters in a call's arguments by this rank's shards."""

    def __init__(self, plan: TensorParallelPlan) -> None:
        self.plan = plan
        self.local: list[torch.Tensor] | None = None

    def __call__(self, args: Sequence[Any]) -> list[Any]:
        if self.local is None:
            self.local = self.prepare(args)
        args = list(args)
        for shard, tensor in zip(self.plan.shards, self.local):
            args[shard.index] = tensor
        return args

    def prepare(self, args: Sequence[Any]) -> list[torch.Tensor]:
        world, rank = self.plan.world_size, self.plan.rank
        local = []
        for shard in self.plan.shards:
            param = args[shard.index]
            key = (shard.dim, shard.segs, world, rank)
            held = _SHARDS.get(param, {})
            if key not in held:
                if param in _RELEASED:
                    raise RuntimeError(
                        f"npu_dit: parameter {shard.name} was released by tensor parallelism under another "
                        f"split and cannot be cut again; compile with options={{'release_weights': False}}"
                    )
                held[key] = cut_shard(param, shard, world, rank)
                _SHARDS[param] = held
            local.append(held[key])
        if self.plan.release_weights:
            released = {}
            for shard in self.plan.shards:
                param = args[shard.index]
                if param not in _RELEASED and param.device.type != "meta":
                    param.untyped_storage().resize_(0)
                    _RELEASED[param] = True
                    released[id(param)] = (param, shard.name)
            if released:
                _shadow(released)
        return local


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters this process really holds for `module`: live storages plus the shards
    cut from released ones (what a tensor-parallel rank keeps)."""
    total = 0
    for _, param in type(module).named_parameters(module):  # the tensors themselves, not their stand-ins
        if param in _RELEASED:
            total += sum(t.numel() * t.element_size() for t in _SHARDS.get(param, {}).values())
        else:
            total += param.numel() * param.element_size()
    return total


def _released_message(name: str, param: torch.Tensor, use: str) -> str:
    return (
        f"npu_dit: cannot {use}: parameter {name} (shape {tuple(param.shape)}) was released by tensor parallelism "
        f"(release_weights=True, the default with tp_degree > 1): this rank keeps only its shard and "
        f"the module runs only through the compiled call. To read the weights or run the module uncompiled, "
        f"compile with options={{'release_weights': False}} (keeps the full weights: no memory saved)."
    )


_METADATA = frozenset({
    "shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_leaf", "is_meta", "is_cuda", "is_sparse",
    "is_quantized", "size", "dim", "numel", "nelement", "element_size", "stride", "is_floating_point",
    "is_complex", "is_contiguous", "names", "grad", "grad_fn",
})


class ReleasedParameter:
    """What `module.<name>` is once tensor parallelism released that parameter: the metadata of the
    parameter, and a clear RuntimeError for any use of its values (never a read of freed memory)."""

    __slots__ = ("_param", "_name")

    def __init__(self, param: torch.Tensor, name: str) -> None:
        self._param = param
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        if attr in _METADATA:
            return getattr(self._param, attr)
        raise RuntimeError(_released_message(self._name, self._param, f"read .{attr} of it"))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        leaves = [*args, *(kwargs or {}).values()]
        released = next(a for a in leaves if isinstance(a, ReleasedParameter))
        use = f"call {getattr(func, '__name__', func)} on it"
        raise RuntimeError(_released_message(released._name, released._param, use))

    def __repr__(self) -> str:
        return (f"ReleasedParameter({self._name}, shape={tuple(self._param.shape)}, dtype={self._param.dtype}: "
                f"released by tensor parallelism; compile with options={{'release_weights': False}} to keep it)")

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(_released_message(self._name, self._param, "apply an operator to it"))

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse
    __matmul__ = __rmatmul__ = __neg__ = __pow__ = __getitem__ = __iter__ = __len__ = __array__ = _refuse
    __float__ = __int__ = __bool__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse


# module -> {attribute name: stand-in}, for the modules whose parameters were released
_SHADOWED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# module -> {method name: override}: `named_parameters` and `_apply` of the owners and their ancestors
_OVERRIDES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STAND_INS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # released parameter -> its ReleasedParameter


def _shadow(released: dict[int, tuple[torch.Tensor, str]]) -> None:
    """Put a ReleasedParameter in front of each released parameter of every module that owns it (one
    walk over the live modules: the executor is handed the parameters, not their modules), and guard
    the owners' and their ancestors' `named_parameters` and `_apply`."""
    parents: dict[int, list[torch.nn.Module]] = {}
    owners: list[torch.nn.Module] = []
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.nn.Module) or not isinstance(obj.__dict__.get("_parameters"), dict):
            continue
        for child in obj.__dict__.get("_modules", {}).values():
            if child is not None:
                parents.setdefault(id(child), []).append(obj)
        for attr, param in obj.__dict__["_parameters"].items():
            hit = released.get(id(param))
            if hit is None or hit[0] is not param:
                continue
            stand_ins = _SHADOWED.get(obj)
            if stand_ins is None:
                stand_ins = _SHADOWED[obj] = {}
                obj.register_state_dict_pre_hook(_refuse_state_dict)
                owners.append(obj)
            stand_ins[attr] = _STAND_INS[param] = ReleasedParameter(param, hit[1])
            obj.__dict__[attr] = stand_ins[attr]
    seen: set[int] = set()
    stack = list(owners)
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if module not in _OVERRIDES:
            _OVERRIDES[module] = {"named_parameters": _named_parameters(module), "_apply": _refuse_apply(module)}
            module.__dict__.update(_OVERRIDES[module])
        stack.extend(parents.get(id(module), ()))


def _named_parameters(module: torch.nn.Module):
    original = type(module).named_parameters

    def named_parameters(*args: Any, **kwargs: Any):
        for name, param in original(module, *args, **kwargs):
            yield name, _STAND_INS.get(param, param)

    return named_parameters


def _refuse_apply(module: torch.nn.Module):
    def _apply(*args: Any, **kwargs: Any) -> Any:
        stand_in = next(p for _, p in module.named_parameters() if isinstance(p, ReleasedParameter))
        raise RuntimeError(_released_message(stand_in._name, stand_in._param,
                                             "move or cast the module (.to(), .half(), .cuda(), ...)"))

    return _apply


def _refuse_state_dict(module: torch.nn.Module, prefix: str, keep_vars: bool) -> None:
    stand_ins = _SHADOWED.get(module, {})
    if stand_ins:
        stand_in = next(iter(stand_ins.values()))
        raise RuntimeError(_released_message(stand_in._name, stand_in._param, "take state_dict()"))


def _hide_stand_ins(args: Any) -> None:
    """Dynamo is about to trace: it must see the parameters and the modules' own methods."""
    for table in (_SHADOWED, _OVERRIDES):
        for module, stand_ins in list(table.items()):
            for attr in stand_ins:
                module.__dict__.pop(attr, None)


def _restore_stand_ins(args: Any) -> None:
    for table in (_SHADOWED, _OVERRIDES):
        for module, stand_ins in list(table.items()):
            module.__dict__.update(stand_ins)


compile_events.subscribe(_hide_stand_ins, _restore_stand_ins)
