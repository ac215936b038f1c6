"""Views, reshapes, concatenation and slicing: dims moved, merged, split, joined or cut.

Each entry reads its dims through the bound arguments (`dims=` or positional, negative or not);
the flows do the dim bookkeeping per kind (`permute` order, `cat`/`split` dim, ...)."""

from __future__ import annotations

import operator

import torch

from npu_dit.passes.ops.core import Call, Semantics, dim_of, register


@register(torch.permute, torch.Tensor.permute, torch.ops.aten.permute.default)
def permute(call: Call) -> Semantics:
    order = call["dims"]
    order = order if isinstance(order, (list, tuple)) else [order]
    return Semantics("permute", call, dims=tuple(dim_of(call, d) for d in order), aliases=True)


@register(torch.transpose, torch.Tensor.transpose, torch.swapaxes, torch.Tensor.swapaxes, torch.swapdims,
          torch.Tensor.swapdims, torch.ops.aten.transpose.int)
def transpose(call: Call) -> Semantics:
    names = [n for n in ("dim0", "axis0") if n in call.args], [n for n in ("dim1", "axis1") if n in call.args]
    d0, d1 = dim_of(call, call[names[0][0]]), dim_of(call, call[names[1][0]])
    order = list(range(call.ndim()))
    order[d0], order[d1] = order[d1], order[d0]
    return Semantics("permute", call, dims=tuple(order), aliases=True)


@register(torch.t, torch.Tensor.t, torch.ops.aten.t.default)
def t(call: Call) -> Semantics:
    return Semantics("permute", call, dims=tuple(reversed(range(call.ndim()))), aliases=True)


@register(torch.movedim, torch.Tensor.movedim, torch.moveaxis, torch.Tensor.moveaxis)
def movedim(call: Call) -> Semantics:
    source, destination = call["source"], call["destination"]
    source = [source] if isinstance(source, int) else list(source)
    destination = [destination] if isinstance(destination, int) else list(destination)
    ndim = call.ndim()
    order: list[int | None] = [None] * ndim
    source = [dim_of(call, s) for s in source]
    for s, d in zip(source, destination):
        order[dim_of(call, d)] = s
    rest = iter(d for d in range(ndim) if d not in source)
    return Semantics("permute", call, dims=tuple(o if o is not None else next(rest) for o in order), aliases=True)


register(
    torch.reshape, torch.Tensor.reshape, torch.Tensor.view, torch.flatten, torch.Tensor.flatten, torch.unflatten,
    torch.Tensor.unflatten, torch.squeeze, torch.Tensor.squeeze, torch.unsqueeze, torch.Tensor.unsqueeze,
    torch.Tensor.view_as, torch.Tensor.reshape_as, torch.ravel, torch.Tensor.ravel,
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.dim, torch.ops.aten._unsafe_view.default,
)(lambda call: Semantics("reshape", call, sizes=("size", "shape", "sizes", "dim", "start_dim", "end_dim"),
                         meta_only=("other",), aliases=True))

register(torch.Tensor.expand, torch.Tensor.expand_as, torch.broadcast_to, torch.Tensor.broadcast_to,
         torch.ops.aten.expand.default)(
    lambda call: Semantics("expand", call, sizes=("size",), meta_only=("other",), aliases=True))


@register(torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default)
def cat(call: Call) -> Semantics:
    dim = int(call.args["dim"] if "dim" in call.args else call.get("axis", 0))
    out = call.out_ndim()
    return Semantics("cat", call, dim=dim + out if dim < 0 else dim)


@register(torch.stack, torch.ops.aten.stack.default)
def stack(call: Call) -> Semantics:
    dim = int(call.get("dim", 0))
    return Semantics("stack", call, dim=dim + call.out_ndim() if dim < 0 else dim)


@register(torch.split, torch.Tensor.split, torch.Tensor.split_with_sizes, torch.split_with_sizes, torch.chunk,
          torch.Tensor.chunk, torch.tensor_split, torch.Tensor.tensor_split, torch.Tensor.unsafe_split,
          torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default, torch.ops.aten.chunk.default)
def split(call: Call) -> Semantics:
    name = "tensor" if "tensor" in call.args else "input"
    return Semantics("split", call, dim=dim_of(call, call.get("dim", 0), name), aliases=True,
                     sizes=("split_size_or_sections", "split_size", "split_sizes", "chunks", "sections",
                            "indices", "tensor_indices_or_sections"))


@register(torch.unbind, torch.Tensor.unbind, torch.ops.aten.unbind.int)
def unbind(call: Call) -> Semantics:
    return Semantics("unbind", call, dim=dim_of(call, call.get("dim", 0)), aliases=True)


@register(torch.narrow, torch.Tensor.narrow, torch.ops.aten.narrow.default)
def narrow(call: Call) -> Semantics:
    return Semantics("narrow", call, dim=dim_of(call, call["dim"]), sizes=("start", "length"), aliases=True)


@register(torch.select, torch.Tensor.select, torch.ops.aten.select.int)
def select(call: Call) -> Semantics:
    return Semantics("select", call, dim=dim_of(call, call["dim"]), sizes=("index",), aliases=True)


@register(operator.getitem)
def getitem(call: Call) -> Semantics:
    base = call.value("input")
    if isinstance(base, (list, tuple)):
        return Semantics("getitem", call)  # an element of a multi-output op
    return Semantics("getitem", call, sizes=("index",), aliases=True)


@register(operator.setitem, torch.Tensor.__setitem__)
def setitem(call: Call) -> Semantics:
    return Semantics("setitem", call, mutates=("input",), sizes=("index",))


@register(torch.Tensor.contiguous, torch.Tensor.clone, torch.clone, torch.Tensor.detach, torch.detach,
          torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.double, torch.Tensor.int,
          torch.Tensor.long, torch.Tensor.bool, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.to,
          torch.Tensor.type, torch.Tensor.requires_grad_, torch.ops.aten.clone.default,
          torch.ops.aten.alias.default, torch.ops.aten._to_copy.default, torch.Tensor.npu if hasattr(torch.Tensor, "npu") else None,
          torch.Tensor.resolve_conj, torch.Tensor.resolve_neg, torch.Tensor.conj)
def same(call: Call) -> Semantics:
    return Semantics("same", call, meta_only=("other",))


@register(getattr(torch._C._autograd, "_get_data_attr", None))
def data(call: Call) -> Semantics:
    return Semantics("same", call, aliases=True)  # `x.data`: the same storage, outside autograd


@register(torch.Tensor.type_as)
def type_as(call: Call) -> Semantics:
    return Semantics("same", call, meta_only=("other",))  # `other` gives only a dtype


@register(torch.view_as_complex, torch.ops.aten.view_as_complex.default)
def view_as_complex(call: Call) -> Semantics:
    return Semantics("view_as_complex", call, aliases=True)


@register(torch.view_as_real, torch.ops.aten.view_as_real.default)
def view_as_real(call: Call) -> Semantics:
    return Semantics("view_as_real", call, aliases=True)


@register(torch.Tensor.repeat, torch.ops.aten.repeat.default)
def repeat(call: Call) -> Semantics:
    """Tiles: output dim d (aligned right with the input) is input dim d repeated `repeats[d]` times;
    leading extra repeats add dims."""
    return Semantics("repeat", call, sizes=("repeats",))


@register(torch.repeat_interleave, torch.Tensor.repeat_interleave)
def repeat_interleave(call: Call) -> Semantics:
    dim = call.args.get("dim")
    return Semantics("repeat_interleave", call, dim=None if dim is None else dim_of(call, dim),
                     sizes=("repeats", "output_size"))


