"""Dimension flow: which dims of which tensors are "the same axis", propagated through the dataflow.

Every non-singleton dim of every tensor in the graph gets a value: an ordered tuple of *atoms*. An
atom is one contiguous stretch of some axis (the image tokens, the text tokens, a hidden dim). Dims
created by an op (an input, `arange`, `expand`, a reshape that merges dims) get fresh atoms; ops
that carry a dim through (pointwise, linear over the last dim, permute, slicing) carry its atoms;
`cat` along a dim concatenates the atom tuples (text ++ image); a slice along it cuts them again.
Wherever an op makes two dims line up (a broadcasting binary op, the key/value sequence of
attention, the mask against the key axis) their atoms are unified (union-find), and a single atom
that meets a concatenation is *expanded* into it (Qwen-Image's image stream meeting the RoPE table
built from two images).

Sizes are Dynamo's symbolic sizes (sympy), so slicing by `s_txt` or by the constant text length is
matched exactly, and a merged dim's size says how lengths combine (`s39 + s50`).

Patch grids: a convolution with kernel == stride and a reshape [H] -> [H/p, p] make dims of whole
patches (`patches`); reshapes that merge dims record the merged atoms (`merges`), and splitting a
merged dim back into factors of the same sizes carries them (unpatchify).

Ops without a rule get fresh atoms for their output dims (never a wrong connection) and are listed
in `FlowResult.opaque`, so a pass that needs a dim to flow through them can refuse clearly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import sympy
import torch
import torch.fx as fx
from torch.utils._sympy.functions import FloorDiv, Mod

from npu_dit.passes.analysis.attention_ops import (
    attention_mask,
    attention_qkv,
    node_value,
)
from npu_dit.passes.analysis.fake_prop import shape_hint
from npu_dit.passes.analysis.symbolic import exprs_equal
from npu_dit.passes.ops import Semantics, semantics

Seq = tuple[int, ...]  # atoms of one dim, in order
DimsValue = tuple  # tuple[Seq | None, ...] for a tensor; list of those for a tuple output


@dataclasses.dataclass(frozen=True)
class Size:
    expr: sympy.Expr
    hint: int | None

    @property
    def is_one(self) -> bool:
        return self.expr == 1

    @property
    def is_static(self) -> bool:
        return not self.expr.free_symbols


def as_size(value: Any) -> Size:
    if isinstance(value, torch.SymInt):
        node = value.node
        hint = node.hint if getattr(node, "hint", None) is not None else None
        expr = node.expr
        if hint is None:
            try:
                hint = shape_hint(node.shape_env, expr) if node.shape_env is not None else None
            except Exception:  # noqa: BLE001 - unbacked: no hint
                hint = None
        return Size(sympy.sympify(expr), hint)
    if isinstance(value, fx.Node):
        return as_size(node_value(value))
    return Size(sympy.Integer(int(value)), int(value))


@functools.lru_cache(maxsize=65536)
def _is_one(value: Any) -> bool:
    """A repeat count known to be 1 (a constant, not a symbol that happens to be 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value == 1


def sizes_equal(a: Size, b: Size) -> bool:
    return exprs_equal(a.expr, b.expr)


class Atoms:
    """Union-find over atoms, with expansions (an atom that stands for a concatenation of atoms)."""

    def __init__(self, shape_env: Any = None) -> None:
        self.shape_env = shape_env
        self.parent: list[int] = []
        self.size: list[Size] = []
        self.origin: list[tuple[fx.Node, int]] = []
        self.expansion: dict[int, Seq] = {}
        self.conflicts: list[tuple[fx.Node, Seq, Seq]] = []

    def new(self, size: Size, origin: tuple[fx.Node, int]) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.origin.append(origin)
        return len(self.parent) - 1

    def find(self, atom: int) -> int:
        root = atom
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[atom] != root:
            self.parent[atom], atom = root, self.parent[atom]
        return root

    def normalize(self, seq: Seq, _depth: int = 0) -> Seq:
        out: list[int] = []
        for atom in seq:
            root = self.find(atom)
            expanded = self.expansion.get(root)
            if expanded is not None and _depth < 64:
                out.extend(self.normalize(expanded, _depth + 1))
            else:
                out.append(root)
        return tuple(out)

    def seq_size(self, seq: Seq) -> sympy.Expr:
        return sympy.Add(*[self.size[self.find(a)].expr for a in seq]) if seq else sympy.Integer(0)

    def _union(self, a: int, b: int, where: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        ea, eb = self.expansion.get(ra), self.expansion.get(rb)
        # keep the older atom as root: its origin is where the axis first appeared
        keep, drop = (ra, rb) if ra < rb else (rb, ra)
        self.parent[drop] = keep
        self.expansion.pop(drop, None)
        if ea is not None and eb is not None:
            self.expansion[keep] = ea if keep == ra else eb
            self.unify(ea, eb, where)
        elif ea is not None or eb is not None:
            self.expansion[keep] = ea if ea is not None else eb  # type: ignore[assignment]

    def unify(self, a: Seq, b: Seq, where: fx.Node) -> None:
        a, b = self.normalize(a), self.normalize(b)
        if a == b:
            return
        if len(a) == len(b):
            for x, y in zip(a, b):
                self._union(x, y, where)
            return
        if len(a) == 1 and a[0] not in b:
            self.expansion[a[0]] = b
            return
        if len(b) == 1 and b[0] not in a:
            self.expansion[b[0]] = a
            return
        groups = self._align(a, b)
        if groups is None:
            self.conflicts.append((where, a, b))
            return
        for ga, gb in groups:
            self.unify(ga, gb, where)

    def _align(self, a: Seq, b: Seq) -> list[tuple[Seq, Seq]] | None:
        """Split two atom tuples of equal total length into groups whose lengths match."""
        groups = []
        i = j = 0
        while i < len(a) and j < len(b):
            gi, gj = [a[i]], [b[j]]
            i, j = i + 1, j + 1
            while not exprs_equal(self.seq_size(tuple(gi)), self.seq_size(tuple(gj)), self.shape_env):
                # the example sizes only choose which side to extend; equality must be proven
                hint_a = sum(self.size[self.find(x)].hint or 0 for x in gi)
                hint_b = sum(self.size[self.find(x)].hint or 0 for x in gj)
                if hint_a <= hint_b and i < len(a):
                    gi.append(a[i])
                    i += 1
                elif j < len(b):
                    gj.append(b[j])
                    j += 1
                else:
                    return None
            groups.append((tuple(gi), tuple(gj)))
        if i != len(a) or j != len(b):
            return None
        return groups


@dataclasses.dataclass
class FlowResult:
    atoms: Atoms
    values: dict[fx.Node, Any]  # node -> DimsValue (tensor), list of DimsValue (tuple) or None
    opaque: list[fx.Node]  # ops with no rule: fresh atoms for their outputs
    # node -> [(input node, dim)] the op combines positions along: softmax, cumsum, flip, norms over
    # the last dims, reductions, a matmul's contracted dims. A sharded dim cannot be mixed locally.
    mixing: dict[fx.Node, list[tuple[fx.Node, int]]] = dataclasses.field(default_factory=dict)
    # node -> [(input node, dim)] sliced with cut points inside an atom (x[:, :1] of the image
    # tokens): not at a stream boundary
    inexact_slices: dict[fx.Node, list[tuple[fx.Node, int]]] = dataclasses.field(default_factory=dict)
    # atom -> (atoms of the dim it was cut from, patch size): a dim of whole patches, made by a
    # convolution with kernel == stride (no padding, no dilation) or by a reshape [.., H, ..] ->
    # [.., H/p, p, ..]; position i of it is rows i*p .. i*p+p-1 of the source dim
    patches: dict[int, tuple[Seq, int]] = dataclasses.field(default_factory=dict)
    # atom -> atoms of the dims a reshape merged into it, outer first ([h, w] -> h*w tokens)
    merges: dict[int, tuple[Seq, ...]] = dataclasses.field(default_factory=dict)
    # node -> the tensors it writes in place (`x.add_(y)`, `x[i] = v`, `inplace=True`)
    mutations: dict[fx.Node, list[fx.Node]] = dataclasses.field(default_factory=dict)
    # calls that return nothing and read tensors, with no entry saying they only have effects
    no_value: list[fx.Node] = dataclasses.field(default_factory=list)
    # `x[i] = v` through a slice cut at stream boundaries, `v` holding the tokens it overwrites
    aligned_writes: set[fx.Node] = dataclasses.field(default_factory=set)

    @functools.cached_property
    def opaque_set(self) -> frozenset:
        return frozenset(self.opaque)

    def dims(self, node: fx.Node) -> DimsValue | None:
        value = self.values.get(node)
        return value if isinstance(value, tuple) else None

    def merged_factors(self, atom: int) -> tuple[Seq, ...] | None:
        """The dims a reshape merged into `atom` (outer first), each normalized; None if not a merge."""
        root = self.atoms.find(atom)
        factors = next((f for k, f in self.merges.items() if self.atoms.find(k) == root), None)
        return None if factors is None else tuple(self.atoms.normalize(f) for f in factors)

    def all_merged_factors(self, atom: int) -> list[tuple[Seq, ...]]:
        """Every reshape's merge that made `atom` (a table and the tokens it meets can both be merges)."""
        root = self.atoms.find(atom)
        return [tuple(self.atoms.normalize(f) for f in factors)
                for k, factors in self.merges.items() if self.atoms.find(k) == root]

    def seq(self, node: fx.Node, dim: int) -> Seq | None:
        value = self.dims(node)
        if value is None:
            return None
        entry = value[dim]
        return None if entry is None else self.atoms.normalize(entry)


# ---------------------------------------------------------------------------------------------
# the propagation


def _shape(node: Any) -> list[Size] | None:
    value = node_value(node)
    if isinstance(value, torch.Tensor):
        return [as_size(s) for s in value.shape]
    return None


class _Flow:
    def __init__(self, gm: fx.GraphModule) -> None:
        from npu_dit.passes.analysis.attention_ops import graph_fake_mode

        self.gm = gm
        mode = graph_fake_mode(gm)
        self.atoms = Atoms(getattr(mode, "shape_env", None))
        self.values: dict[fx.Node, Any] = {}
        self.opaque: list[fx.Node] = []
        self.mixing: dict[fx.Node, list[tuple[fx.Node, int]]] = {}
        self.inexact_slices: dict[fx.Node, list[tuple[fx.Node, int]]] = {}
        self.patches: dict[int, tuple[Seq, int]] = {}
        self.merges: dict[int, tuple[Seq, ...]] = {}
        self.mutations: dict[fx.Node, list[fx.Node]] = {}
        self.no_value: list[fx.Node] = []
        self.aligned_writes: set[fx.Node] = set()

    # -- helpers ------------------------------------------------------------------------------
    def fresh(self, node: fx.Node, shape: list[Size], dim: int) -> Seq | None:
        if shape[dim].is_one:
            return None
        return (self.atoms.new(shape[dim], (node, dim)),)

    def fresh_all(self, node: fx.Node) -> DimsValue | None:
        shape = _shape(node)
        if shape is None:
            return None
        return tuple(self.fresh(node, shape, d) for d in range(len(shape)))

    def dims(self, arg: Any) -> DimsValue | None:
        if isinstance(arg, fx.Node):
            value = self.values.get(arg)
            return value if isinstance(value, tuple) else None
        return None

    def norm(self, seq: Seq | None) -> Seq | None:
        return None if seq is None else self.atoms.normalize(seq)

    def broadcast(self, node: fx.Node, tensor_args: Sequence[fx.Node]) -> DimsValue | None:
        out = _shape(node)
        if out is None:
            return None
        values = [v for v in (self.dims(a) for a in tensor_args) if v is not None]
        return tuple(self.join(node, values, out))

    def join(self, node: fx.Node, values: Sequence[tuple], shape: list[Size]) -> list[Seq | None]:
        """Right-aligned broadcasting of dim values onto `shape`: aligned dims are unified; a dim no
        value carries gets a fresh atom (or None when its size is 1)."""
        result: list[Seq | None] = []
        for d in range(len(shape)):
            candidates = []
            for value in values:
                vd = d - (len(shape) - len(value))
                if vd >= 0 and value[vd] is not None:
                    candidates.append(value[vd])
            if not candidates:
                result.append(None if shape[d].is_one else (self.atoms.new(shape[d], (node, d)),))
                continue
            for other in candidates[1:]:
                self.atoms.unify(candidates[0], other, node)
            result.append(self.atoms.normalize(candidates[0]))
        return result

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if isinstance(node_value(a), torch.Tensor)]

    def slice_seq(self, node: fx.Node, seq: Seq | None, start: Size, stop: Size, out_size: Size, dim: int,
                  source: tuple[fx.Node, int] | None = None) -> Seq | None:
        """The atoms of `seq[start:stop]`; exact when the cut falls on atom boundaries. An inexact
        cut of `source` (input node, dim) is recorded."""
        if seq is None:
            return None if out_size.is_one else (self.atoms.new(out_size, (node, dim)),)
        if out_size.is_one:
            if source is not None:  # one position out of a stretch of tokens
                self.inexact_slices.setdefault(node, []).append(source)
            return None
        seq = self.atoms.normalize(seq)
        offset = sympy.Integer(0)
        picked: list[int] = []
        started = exprs_equal(start.expr, sympy.Integer(0))
        for atom in seq:
            if not started and self._eq(offset, start.expr):
                started = True
            if started:
                picked.append(atom)
            offset = offset + self.atoms.size[atom].expr
            if started and self._eq(offset, stop.expr):
                return tuple(picked)
        if len(seq) == 1 and exprs_equal(start.expr, 0) and self._eq(self.atoms.size[seq[0]].expr, stop.expr):
            return seq
        if self._eq(out_size.expr, self.atoms.seq_size(seq)):
            return seq  # the whole dim (a slice spelled with bounds)
        if source is not None:
            self.inexact_slices.setdefault(node, []).append(source)
        return (self.atoms.new(out_size, (node, dim)),)

    def _eq(self, a: sympy.Expr, b: sympy.Expr) -> bool:
        return exprs_equal(a, b, self.atoms.shape_env)

    # -- rules --------------------------------------------------------------------------------
    def run(self) -> FlowResult:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" or node.op == "get_attr":
                self.values[node] = self.fresh_all(node)
            elif node.op in ("call_function", "call_method"):
                self.values[node] = self.visit(node)
            elif node.op == "call_module":
                self.values[node] = self.fresh_all(node)
                self.opaque.append(node)
        return FlowResult(self.atoms, self.values, self.opaque, self.mixing, self.inexact_slices,
                          self.patches, self.merges, self.mutations, self.no_value, self.aligned_writes)

    def visit(self, node: fx.Node) -> Any:
        value = node_value(node)
        changed = getattr(node.target, "npu_dit_changed_dim", None)
        if node.op == "call_function" and changed is not None and node.args and self.dims(node.args[0]) is not None:
            # npu-dit's own graph calls (tensor-parallel collectives, feature slices): dims carried,
            # except the one they change (`npu_dit_changed_dim(node)`), which gets a fresh atom
            src, out = self.dims(node.args[0]), _shape(node)
            dim = changed(node)
            if dim is None:
                return src
            dim = _dim(int(dim), len(src))
            return tuple(self.fresh(node, out, d) if d == dim else src[d] for d in range(len(src)))
        sem = semantics(node)
        if sem is None:
            if _reads_or_makes_tensors(node, value):
                self.opaque.append(node)  # no rule: fresh dims; a pass that needs a dim through it refuses
            return self.fresh_multi(node, value)
        if sem.mutates:
            written = [sem.call.args.get(name) for name in sem.mutates]
            self.mutations[node] = [w for w in written if isinstance(w, fx.Node)]
        kind = sem.kind
        if kind == "setitem":
            self.rule_setitem(node, sem)
        if value is None:
            if kind not in ("effect", "setitem") and _reads_or_makes_tensors(node, value):
                self.no_value.append(node)
            return None
        if kind == "attention":
            out = self.rule_attention(node)
            if isinstance(value, (tuple, list)):  # a lowered kernel returning (out, lse, ...)
                return [out] + [self.fresh_all_value(node, v, k) for k, v in enumerate(value) if k > 0]
            return out
        if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
            return self.visit_multi(node, sem)
        if kind == "getitem":
            src = self.values.get(node.args[0])
            if isinstance(src, list) and isinstance(node.args[1], int):
                return src[node.args[1]]
        if not isinstance(value, torch.Tensor):
            return None
        x = sem.call.args.get("input")
        if kind == "getitem":
            return self.rule_getitem(node)
        if kind == "linear":
            src, out = self.dims(x), _shape(node)
            if src is None:
                return self.fresh_all(node)
            self.mixing[node] = [(x, len(src) - 1)]  # the contracted input features
            return tuple(src[:-1]) + (self.fresh(node, out, len(out) - 1),)
        if kind == "same":
            return self.dims(x) if self.dims(x) is not None else self.fresh_all(node)
        if kind == "permute":
            return self._reorder(node, x, list(sem.dims or ()))
        if kind == "reshape":
            return self.rule_reshape(node, x)
        if kind == "expand":
            return self.rule_expand(node, x)
        if kind == "cat":
            return self.rule_cat(node, sem)
        if kind == "stack":
            return self.rule_stack(node, sem)
        if kind == "reduce":
            return self.rule_reduce(node, sem)
        if kind == "conv":
            return self.rule_conv(node)
        if kind == "embedding":  # a row of the table per index: the indices' dims, then the table's features
            indices = sem.call.args.get("input", sem.call.args.get("indices"))
            src, out = self.dims(indices), _shape(node)
            if src is None or out is None or len(out) != len(src) + 1:
                return self.fresh_all(node)
            return tuple(src) + (self.fresh(node, out, len(out) - 1),)
        if kind == "outer":
            a, b = self.dims(x), self.dims(sem.call.args.get("vec2"))
            out = _shape(node)
            return (a[0] if a else self.fresh(node, out, 0), b[0] if b else self.fresh(node, out, 1))
        if kind == "view_as_complex":
            src = self.dims(x)
            return tuple(src[:-1]) if src is not None else self.fresh_all(node)
        if kind == "view_as_real":
            src = self.dims(x)
            out = _shape(node)
            return (tuple(src) + (self.fresh(node, out, len(out) - 1),)) if src is not None else self.fresh_all(node)
        if kind == "repeat_interleave":
            return self.rule_repeat_interleave(node, sem)
        if kind == "repeat":
            return self.rule_repeat(node, sem)
        if kind == "matmul":
            return self.rule_matmul(node, x, sem.call.args.get("other", sem.call.args.get("mat2")))
        if kind == "einsum":
            return self.rule_einsum(node, sem)
        if kind == "creation":
            return self.fresh_all(node)
        if kind == "like":
            return self.broadcast(node, [x])
        if kind == "mix":
            return self.rule_mixing(node, sem)
        if kind == "narrow":
            return self.rule_narrow(node, sem)
        if kind == "select":
            return self.rule_select(node, sem)
        if kind == "pad":
            return self.rule_pad(node, sem)
        if kind == "pointwise":
            tensors, out = sem.tensor_inputs(), _shape(node)
            if tensors and _is_broadcast_of(out, [_shape(t) for t in tensors], self._eq):
                return self.broadcast(node, tensors)
        self.opaque.append(node)  # no dim rule for this kind (pad, resampling, ...): fresh dims
        return self.fresh_all(node)

    def fresh_multi(self, node: fx.Node, value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [self.fresh_all_value(node, v, k) for k, v in enumerate(value)]
        return self.fresh_all(node) if isinstance(value, torch.Tensor) else None

    def rule_mixing(self, node: fx.Node, sem: Semantics) -> DimsValue | None:
        """Shape-preserving ops that mix positions along some dims: the dims are carried, and the
        mixed ones recorded (sharding one of them would change the result)."""
        x = sem.call.args.get("input")
        src, out = self.dims(x), _shape(node)
        if src is None or out is None or len(src) != len(out):
            self.opaque.append(node)
            return self.fresh_all(node)
        mixed = sem.dims if sem.dims is not None else tuple(range(len(src)))
        self.mixing[node] = [(x, d) for d in mixed]
        return tuple(src)

    def rule_pad(self, node: fx.Node, sem: Semantics) -> DimsValue | None:
        """F.pad: the dims it pads get new positions (fresh atoms; padding a sharded dim would pad
        every rank's chunk, so it is recorded as mixing), the others are carried."""
        x = sem.call.args.get("input")
        src, out, pad = self.dims(x), _shape(node), sem.call.args.get("pad")
        if src is None or out is None or not isinstance(pad, (list, tuple)) or len(src) != len(out):
            self.opaque.append(node)
            return self.fresh_all(node)
        padded = {len(src) - 1 - i // 2 for i, p in enumerate(pad) if not (isinstance(p, int) and p == 0)}
        self.mixing[node] = [(x, d) for d in sorted(padded)]
        return tuple(self.fresh(node, out, d) if d in padded else src[d] for d in range(len(src)))

    def rule_narrow(self, node: fx.Node, sem: Semantics) -> DimsValue | None:
        x = sem.call.args.get("input")
        src, in_shape, out = self.dims(x), _shape(x), _shape(node)
        if src is None or in_shape is None:
            return self.fresh_all(node)
        d = sem.dim
        start = _bound(sem.call.args.get("start"), in_shape[d], default=0)
        stop = Size(start.expr + out[d].expr, (start.hint or 0) + (out[d].hint or 0))
        seq = self.slice_seq(node, src[d], start, stop, out[d], d, (x, d))
        return tuple(seq if k == d else src[k] for k in range(len(src)))

    def rule_select(self, node: fx.Node, sem: Semantics) -> DimsValue | None:
        x = sem.call.args.get("input")
        src = self.dims(x)
        if src is None:
            return self.fresh_all(node)
        if src[sem.dim] is not None:  # one position of the dim
            self.inexact_slices.setdefault(node, []).append((x, sem.dim))
        return tuple(src[k] for k in range(len(src)) if k != sem.dim)

    def _reorder(self, node: fx.Node, src_node: Any, order: list[int]) -> DimsValue | None:
        src = self.dims(src_node)
        if src is None:
            return self.fresh_all(node)
        order = [_dim(d, len(src)) for d in order]
        return tuple(src[d] for d in order)

    def rule_reshape(self, node: fx.Node, src_node: Any) -> DimsValue | None:
        src = self.dims(src_node)
        in_shape, out_shape = _shape(src_node), _shape(node)
        if src is None or in_shape is None or out_shape is None:
            return self.fresh_all(node)
        result: list[Seq | None] = [None] * len(out_shape)
        ins = [d for d, s in enumerate(in_shape) if not s.is_one]
        outs = [d for d, s in enumerate(out_shape) if not s.is_one]
        i = j = 0
        while i < len(ins) and j < len(outs):
            gi, gj = [ins[i]], [outs[j]]
            i, j = i + 1, j + 1
            while not self.group_eq(in_shape, gi, out_shape, gj):
                hi, hj = _prod_hint(in_shape, gi), _prod_hint(out_shape, gj)
                if hi is not None and hj is not None and hi < hj and i < len(ins):
                    gi.append(ins[i])
                    i += 1
                elif hi is not None and hj is not None and hj < hi and j < len(outs):
                    gj.append(outs[j])
                    j += 1
                else:
                    return self.fresh_all(node)
            if len(gi) == 1 and len(gj) == 1:
                result[gj[0]] = src[gi[0]]
            elif len(gi) == 1:
                for d, seq in zip(gj, self.split_dim(node, src[gi[0]], in_shape[gi[0]], out_shape, gj)):
                    result[d] = seq
            else:
                for d in gj:
                    result[d] = self.fresh(node, out_shape, d)
                if len(gj) == 1 and result[gj[0]] is not None and all(src[d] is not None for d in gi):
                    self.merges[result[gj[0]][0]] = tuple(self.atoms.normalize(src[d]) for d in gi)
        for d in outs[j:]:
            result[d] = self.fresh(node, out_shape, d)
        return tuple(result)

    def split_dim(self, node: fx.Node, seq: Seq | None, size: Size, out_shape: list[Size], outs: list[int]) -> list[Seq | None]:
        """One dim reshaped into several: back into the atoms a reshape merged it from when their
        sizes match exactly (unpatchify: h*w tokens -> [h, w]); [H] -> [H/p, p] with a constant p
        is a dim of whole patches of H; anything else gets fresh atoms."""
        fresh = [self.fresh(node, out_shape, d) for d in outs]
        if seq is None:
            return fresh
        seq = self.atoms.normalize(seq)
        if len(seq) == 1:
            factors = self.merged_factors(seq[0])
            if factors is not None and len(factors) == len(outs) and all(
                self._eq(self.atoms.seq_size(f), out_shape[d].expr) for f, d in zip(factors, outs)
            ):
                return list(factors)
        patch = self.proven_int(out_shape[outs[-1]])
        if len(outs) == 2 and patch is not None and patch > 1 and fresh[0] is not None:
            self.patches[fresh[0][0]] = (seq, patch)
        return fresh

    def group_eq(self, in_shape: list[Size], gi: list[int], out_shape: list[Size], gj: list[int]) -> bool:
        """prod(in_shape[gi]) == prod(out_shape[gj]), proven. A dim split into factors that Dynamo
        wrote as divisions of it (a patchify `reshape(B, C, H // p, p, ..)` is recorded as
        `[.., H//2, H//(H//2), ..]`, with the guards `H % (H//2) == 0`, `H//(H//2) == 2`) is proven
        by the division identity: H == f * (H // f) when H % f == 0."""
        if self._eq(_prod(in_shape, gi), _prod(out_shape, gj)):
            return True
        hint_in, hint_out = _prod_hint(in_shape, gi), _prod_hint(out_shape, gj)
        if hint_in is None or hint_in != hint_out:
            return False  # not a whole group yet (the caller extends it): no proof to attempt
        if len(gi) == 1 and len(gj) > 1:
            return self.divides_into(in_shape[gi[0]].expr, [out_shape[d].expr for d in gj])
        if len(gj) == 1 and len(gi) > 1:
            return self.divides_into(out_shape[gj[0]].expr, [in_shape[d].expr for d in gi])
        return False

    def divides_into(self, whole: sympy.Expr, factors: list[sympy.Expr]) -> bool:
        """whole == prod(factors), peeling off the outer or the inner factor f while whole % f == 0
        is proven and recursing on whole // f."""
        if len(factors) == 1:
            return self._eq(whole, factors[0])
        for k in dict.fromkeys((0, len(factors) - 1)):
            try:
                remainder, quotient = Mod(whole, factors[k]), FloorDiv(whole, factors[k])
            except (ZeroDivisionError, TypeError):
                continue
            if self._eq(remainder, sympy.Integer(0)) and self.divides_into(quotient, factors[:k] + factors[k + 1:]):
                return True
        return False

    def proven_int(self, size: Size) -> int | None:
        """The size as an int when it is a constant, or provably equal to its example value under
        the ShapeEnv's guards (`H//(H//2) == 2`); else None."""
        if size.is_static:
            return int(size.expr)
        if size.hint is not None and self._eq(size.expr, sympy.Integer(size.hint)):
            return size.hint
        return None

    def merged_factors(self, atom: int) -> tuple[Seq, ...] | None:
        root = self.atoms.find(atom)
        for key, factors in self.merges.items():
            if self.atoms.find(key) == root:
                return tuple(self.atoms.normalize(f) for f in factors)
        return None

    def rule_conv(self, node: fx.Node) -> DimsValue | None:
        """conv{1,2,3}d(x [B, Cin, *space], w [Cout, Cin/g, *kernel], b, stride, padding, dilation, g):
        batch carried, channels contracted (mixed), each spatial dim a fresh dim; with kernel ==
        stride, no padding and no dilation it is a dim of whole patches of the input's (recorded in
        `patches`); otherwise positions along it are mixed (overlapping or padded windows)."""
        call = semantics(node).call
        x, w = call.args.get("input"), call.args.get("weight")
        src, out, w_shape = self.dims(x), _shape(node), _shape(w)
        if src is None or out is None or w_shape is None or len(src) != len(out):
            self.opaque.append(node)
            return self.fresh_all(node)
        spatial = len(out) - 2
        stride, padding, dilation = conv_params(node, spatial)
        result: list[Seq | None] = [src[0], self.fresh(node, out, 1)]
        mixed = [1]
        for k in range(spatial):
            d = 2 + k
            result.append(self.fresh(node, out, d))
            kernel = w_shape[d]
            exact = (
                kernel.is_static and isinstance(stride[k], int) and int(kernel.expr) == stride[k]
                and padding[k] == 0 and dilation[k] == 1 and src[d] is not None and result[d] is not None
            )
            if exact and stride[k] > 1:
                self.patches[result[d][0]] = (self.atoms.normalize(src[d]), stride[k])
            elif not exact or stride[k] != 1:
                mixed.append(d)
            elif result[d] is not None:  # a 1x1 kernel: the same positions
                result[d] = src[d]
        self.mixing[node] = [(x, d) for d in mixed]
        return tuple(result)

    def rule_expand(self, node: fx.Node, src_node: Any) -> DimsValue | None:
        src = self.dims(src_node)
        out = _shape(node)
        if src is None:
            return self.fresh_all(node)
        offset = len(out) - len(src)
        result = []
        for d in range(len(out)):
            sd = d - offset
            if sd >= 0 and src[sd] is not None:
                result.append(src[sd])
            else:
                result.append(self.fresh(node, out, d))
        return tuple(result)

    def rule_cat(self, node: fx.Node, sem: Semantics) -> DimsValue | None:
        pieces = sem.call.args["tensors"]
        dim = sem.dim
        out = _shape(node)
        pieces = [p for p in pieces if isinstance(p, fx.Node) and _shape(p) is not None and len(_shape(p)) == len(out)]
        result: list[Seq | None] = []
        for d in range(len(out)):
            if d == dim:
                joined: list[int] = []
                for p in pieces:
                    pshape = _shape(p)
                    if exprs_equal(pshape[d].expr, sympy.Integer(0)):
                        continue
                    pd = self.dims(p)
                    seq = pd[d] if pd is not None else None
                    if seq is None:
                        seq = (self.atoms.new(pshape[d], (p, d)),)
                    joined.extend(self.atoms.normalize(seq))
                result.append(tuple(joined) if not out[d].is_one else None)
            else:
                values = [(self.dims(p)[d],) for p in pieces if self.dims(p) is not None]
                result.append(self.join(node, values, [out[d]])[0])
        return tuple(result)

    def rule_stack(self, node: fx.Node, sem: Semantics) -> DimsValue | None:
        pieces = [p for p in sem.call.args["tensors"] if isinstance(p, fx.Node)]
        dim = sem.dim
        out = _shape(node)
        inner = self.join(node, [v for v in (self.dims(p) for p in pieces) if v is not None],
                          [s for d, s in enumerate(out) if d != dim])
        inner.insert(dim, self.fresh(node, out, dim))
        return tuple(inner)

    def rule_reduce(self, node: fx.Node, sem: Semantics) -> DimsValue | None:
        x = sem.call.args.get("input")
        src = self.dims(x)
        out = _shape(node) if isinstance(node_value(node), torch.Tensor) else None
        if src is None:
            return self.fresh_all(node) if out is not None else None
        keepdim = sem.keepdim
        if sem.dims is None:
            self.mixing[node] = [(x, d) for d in range(len(src))]
            if out is None:
                return None
            return tuple(None for _ in out) if keepdim else self.fresh_all(node)
        reduced = set(sem.dims)
        self.mixing[node] = [(x, d) for d in sorted(reduced)]
        if keepdim:
            return tuple(None if d in reduced else src[d] for d in range(len(src)))
        return tuple(src[d] for d in range(len(src)) if d not in reduced)

    def rule_repeat_interleave(self, node: fx.Node, sem: Semantics) -> DimsValue | None:
        src = self.dims(sem.call.args.get("input"))
        dim = sem.dim
        out = _shape(node)
        if src is None or dim is None:
            return self.fresh_all(node)
        return tuple(self.fresh(node, out, d) if d == dim else src[d] for d in range(len(src)))

    def rule_repeat(self, node: fx.Node, sem: Semantics) -> DimsValue | None:
        """A dim repeated once is kept; a tiled dim (and a new leading one) holds fresh positions."""
        src = self.dims(sem.call.args.get("input"))
        repeats = list(sem.call.args.get("repeats") or ())
        out = _shape(node)
        if src is None or len(repeats) != len(out):
            return self.fresh_all(node)
        offset = len(out) - len(src)
        return tuple(src[d - offset] if d >= offset and src[d - offset] is not None and _is_one(repeats[d])
                     else self.fresh(node, out, d) for d in range(len(out)))

    def rule_matmul(self, node: fx.Node, left: Any, right: Any) -> DimsValue | None:
        a, b = self.dims(left), self.dims(right)
        out = _shape(node)
        if a is None or b is None or len(a) < 2 or len(b) < 2:
            return self.fresh_all(node)
        if a[-1] and b[-2]:
            self.atoms.unify(a[-1], b[-2], node)
        self.mixing[node] = [(left, len(a) - 1), (right, len(b) - 2)]  # contracted
        return tuple(self.join(node, [a[:-2], b[:-2]], out[:-2])) + (a[-2], b[-1])

    def rule_einsum(self, node: fx.Node, sem: Semantics) -> DimsValue | None:
        """Each output letter carries the dims of that letter in the operands (unified: they line up), the
        ellipsis dims broadcast right-aligned; letters missing from the output are contracted (mixed)."""
        from npu_dit.passes.ops.nn import einsum_operands

        inputs, operands, out_subs = einsum_operands(sem.call)
        out = _shape(node)
        by_letter: dict[str, list] = {}
        ellipses: list[tuple] = []
        mixed: list[tuple[fx.Node, int]] = []
        for subs, operand in zip(inputs, operands):
            dims, shape = self.dims(operand), _shape(operand)
            if dims is None or shape is None or subs.count(".") > 1 or len(subs) - subs.count(".") > len(dims):
                self.opaque.append(node)
                return self.fresh_all(node)
            rest = len(dims) - (len(subs) - 1) if "." in subs else 0
            d = 0
            for letter in subs:
                if letter == ".":
                    ellipses.append(tuple(dims[d:d + rest]))
                    d += rest
                    continue
                if dims[d] is not None:
                    by_letter.setdefault(letter, []).append(dims[d])
                if letter not in out_subs:
                    mixed.append((operand, d))
                d += 1
        if out is None or out_subs.count(".") > 1:
            self.opaque.append(node)
            return self.fresh_all(node)
        n_ellipsis = len(out) - (len(out_subs) - out_subs.count("."))
        self.mixing[node] = mixed
        result: list[Seq | None] = []
        for letter in out_subs:
            if letter == ".":
                result.extend(self.join(node, ellipses, out[len(result):len(result) + n_ellipsis]))
                continue
            seqs = by_letter.get(letter, [])
            for other in seqs[1:]:
                self.atoms.unify(seqs[0], other, node)
            d = len(result)
            result.append(self.atoms.normalize(seqs[0]) if seqs and not out[d].is_one else self.fresh(node, out, d))
        return tuple(result)

    def rule_attention(self, node: fx.Node) -> DimsValue | None:
        q, k, v = attention_qkv(node)
        qd, kd, vd = self.dims(q), self.dims(k), self.dims(v)
        out = _shape(node)
        if qd is None or kd is None or vd is None:
            return self.fresh_all(node)
        seq_q, seq_k = _attention_seq_dims(node, len(qd))
        if kd[seq_k] is not None and vd[seq_k] is not None:
            self.atoms.unify(kd[seq_k], vd[seq_k], node)
        md = self.dims(attention_mask(node))
        if md is not None:
            if md[-1] is not None and kd[seq_k] is not None:
                self.atoms.unify(md[-1], kd[seq_k], node)
            if len(md) >= 2 and md[-2] is not None and qd[seq_q] is not None:
                self.atoms.unify(md[-2], qd[seq_q], node)
        result = list(qd[:-1]) + [vd[-1]]
        if out is not None and len(out) != len(result):
            return self.fresh_all(node)
        return tuple(result)

    def rule_setitem(self, node: fx.Node, sem: Semantics) -> None:
        """`base[index] = value`: the region written has the dims a read of `base[index]` would have,
        and the value fills it (their dims are one). A write through a slice cut at stream boundaries
        of a value holding the same tokens is position-aligned (`aligned_writes`): done on local
        tokens it writes exactly this rank's part."""
        base, index, value = sem.call.args["input"], sem.call.args["index"], sem.call.args["value"]
        if self.dims(base) is None:
            return
        from npu_dit.passes.analysis.attention_ops import graph_fake_mode

        mode = graph_fake_mode(self.gm)
        try:
            with mode, mode.shape_env.suppress_guards():
                region = node_value(base)[fx.node.map_arg(index, node_value)]
        except Exception:  # noqa: BLE001 - an index the fake run cannot take: no alignment claimed
            self.opaque.append(node)
            return
        out_shape = [as_size(s) for s in region.shape]
        dims = self.rule_getitem(node, base, index, out_shape)
        if dims is None or len(dims) != len(out_shape) or node in self.opaque:
            return
        vd = self.dims(value) if isinstance(value, fx.Node) else None
        if vd is not None:
            if not _is_broadcast_of(out_shape, [_shape(value)], self._eq):
                return
            self.join(node, [dims, vd], out_shape)
        # a cut inside a stretch of tokens is in `inexact_slices` (a pass refuses it where the tokens
        # are sharded); a strided slice of the features (RoPE's even/odd halves) is not a concern
        self.aligned_writes.add(node)

    def rule_getitem(self, node: fx.Node, base: Any = None, index: Any = None,
                     out_shape: list[Size] | None = None) -> DimsValue | None:
        if base is None:
            base, index = node.args[0], node.args[1]
            out_shape = _shape(node)
        src = self.dims(base)
        in_shape = _shape(base)
        if src is None or in_shape is None:
            return self.fresh_all(node)
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, fx.Node) and isinstance(node_value(i), torch.Tensor) for i in index) or any(
            isinstance(i, (list, torch.Tensor)) for i in index
        ):
            self.opaque.append(node)
            return self.fresh_all(node)
        consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for i in index:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (len(src) - consumed))
            else:
                expanded.append(i)
        expanded.extend([slice(None)] * (len(src) - sum(1 for i in expanded if i is not None)))
        result: list[Seq | None] = []
        d = 0
        for i in expanded:
            if i is None:
                result.append(None)
                continue
            if isinstance(i, slice):
                out_d = len(result)
                full = i.start is None and i.stop is None and i.step in (None, 1)
                if full:
                    result.append(src[d])
                elif i.step not in (None, 1):  # every k-th position: no stretch of the tokens
                    if src[d] is not None:
                        self.inexact_slices.setdefault(node, []).append((base, d))
                    result.append(self.fresh(node, out_shape, out_d))
                else:
                    start = _bound(i.start, in_shape[d], default=0)
                    stop = _bound(i.stop, in_shape[d], default=None)
                    result.append(self.slice_seq(node, src[d], start, stop, out_shape[out_d], out_d, (base, d)))
            elif src[d] is not None:  # an int or SymInt index picks one position of the dim
                self.inexact_slices.setdefault(node, []).append((base, d))
            d += 1
        return tuple(result)

    def visit_multi(self, node: fx.Node, sem: Semantics) -> list[DimsValue | None]:
        """split / chunk / tensor_split / unbind / max(dim) / sort and friends."""
        value = node_value(node)
        src_node = sem.call.args.get("input", sem.call.args.get("tensor"))
        src = self.dims(src_node)
        in_shape = _shape(src_node) if isinstance(src_node, fx.Node) else None
        if src is None or in_shape is None:
            if sem.kind not in ("split", "unbind", "reduce", "mix"):
                self.opaque.append(node)
            return [self.fresh_all_value(node, v, k) for k, v in enumerate(value)]
        if sem.kind == "split":
            dim = sem.dim
            outs = []
            offset = Size(sympy.Integer(0), 0)
            for piece in value:
                size = as_size(piece.shape[dim])
                stop = Size(offset.expr + size.expr, (offset.hint or 0) + (size.hint or 0))
                seq = self.slice_seq(node, src[dim], offset, stop, size, dim, (src_node, dim))
                outs.append(tuple(seq if d == dim else src[d] for d in range(len(src))))
                offset = stop
            return outs
        if sem.kind == "unbind":
            dim = sem.dim
            if src[dim] is not None:
                self.inexact_slices.setdefault(node, []).append((src_node, dim))
            return [tuple(src[d] for d in range(len(src)) if d != dim) for _ in value]
        if sem.kind == "reduce":  # max/min with dim -> (values, indices)
            reduced = set(range(len(src))) if sem.dims is None else set(sem.dims)
            self.mixing[node] = [(src_node, d) for d in sorted(reduced)]
            kept = tuple(None if d in reduced else src[d] for d in range(len(src))) if sem.keepdim else tuple(
                src[d] for d in range(len(src)) if d not in reduced)
            return [kept if isinstance(v, torch.Tensor) and v.dim() == len(kept) else self.fresh_all_value(node, v, k)
                    for k, v in enumerate(value)]
        if sem.kind == "mix":  # sort / cummax -> (values, indices), shape kept
            mixed = sem.dims if sem.dims is not None else tuple(range(len(src)))
            self.mixing[node] = [(src_node, d) for d in mixed]
            return [tuple(src) for _ in value]
        self.opaque.append(node)
        return [self.fresh_all_value(node, v, k) for k, v in enumerate(value)]

    def fresh_all_value(self, node: fx.Node, value: Any, k: int) -> DimsValue | None:
        if not isinstance(value, torch.Tensor):
            return None
        shape = [as_size(s) for s in value.shape]
        return tuple(None if s.is_one else (self.atoms.new(s, (node, 1000 * (k + 1) + d)),) for d, s in enumerate(shape))


def _attention_seq_dims(node: fx.Node, ndim: int) -> tuple[int, int]:
    """Sequence dims of q and k at an attention call: -2 for SDPA's [..., H, S, D] layout."""
    layout = node.meta.get("npu_dit.attention_layout", "BNSD")
    seq = layout.index("S") - len(layout) + ndim if layout in ("BNSD", "BSND") else ndim - 2
    return seq, seq


def conv_params(node: fx.Node, spatial: int) -> tuple[list[Any], list[Any], list[Any]]:
    """(stride, padding, dilation) of a conv{1,2,3}d call, one entry per spatial dim."""
    sem = semantics(node)
    args = sem.call.args if sem is not None else {}
    params = [args.get(k, default) for k, default in (("stride", 1), ("padding", 0), ("dilation", 1))]
    return tuple([p] * spatial if isinstance(p, int) else list(p) for p in params)  # type: ignore[return-value]


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _prod(shape: list[Size], dims: list[int]) -> sympy.Expr:
    return sympy.Mul(*[shape[d].expr for d in dims])


def _prod_hint(shape: list[Size], dims: list[int]) -> int | None:
    result = 1
    for d in dims:
        if shape[d].hint is None:
            return None
        result *= shape[d].hint
    return result


def _bound(value: Any, size: Size, default: int | None) -> Size:
    if value is None:
        return Size(sympy.Integer(default), default) if default is not None else size
    bound = as_size(value)
    if bound.hint is not None and bound.hint < 0 or (bound.is_static and int(bound.expr) < 0):
        return Size(size.expr + bound.expr, (size.hint or 0) + (bound.hint or 0))
    return bound


def _is_broadcast_of(out: list[Size] | None, shapes: list[list[Size] | None], eq: Any = None) -> bool:
    if out is None or any(s is None for s in shapes):
        return False
    if any(len(s) > len(out) for s in shapes):
        return False
    for d in range(1, len(out) + 1):
        sizes = [s[-d] for s in shapes if len(s) >= d and not s[-d].is_one]
        if out[-d].is_one:
            if sizes:
                return False
            continue
        if not sizes or not all(sizes_equal(s, out[-d]) or (eq is not None and eq(s.expr, out[-d].expr)) for s in sizes):
            return False
    return True


def _reads_or_makes_tensors(node: fx.Node, value: Any) -> bool:
    if isinstance(value, torch.Tensor) or (isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value)):
        return True
    return any(isinstance(node_value(a), torch.Tensor) for a in node.all_input_nodes)


def dim_flow(gm: fx.GraphModule) -> FlowResult:
    return _Flow(gm).run()
