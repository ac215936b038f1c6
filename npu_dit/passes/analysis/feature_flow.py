"""Feature flow: which linears can be column- or row-sharded, derived from the graph (Megatron TP).

The same question as the token-dim flow, asked of feature and head dims: if a linear's output
features are split over N ranks (column sharding), where does that split travel, and does every op
on the way compute its local piece exactly? Placements are propagated forward through the graph in
DTensor's style: a value is *replicated* or *sharded* on one dim, in contiguous blocks. A sharded
dim is a tuple of *segments* (`segs`), each split into N equal blocks; rank r holds block r of every
segment, in order (a concatenation of two column-sharded tensors along their features is two
segments: FLUX's single-block `proj_out(cat([attn_out, mlp_out]))`).

    to_q(x) [B,S,F]  --unflatten-->  [B,S,H,D] (heads/N: the split falls on whole heads)
            --rms_norm over D, RoPE over D, permute, SDPA over heads (q, k, v alike)-->
            --permute, flatten--> [B,S,F] --> to_out: row-sharded (partial sum; all-reduce after)

Op rules come from the one table in `dim_flow` (which ops are pointwise, which mix positions along
which dims, which reduce); the rules here only say what a split feature dim does through each of
them. Every op that meets a sharded dim needs a rule: a norm, softmax or reduction over it, a slice
that cuts a block, an op without a rule, or a sharded value reaching the graph output is a
*conflict*. Propagation starts optimistically with every parameter linear column-sharded; each
conflict un-shards the column linears whose split reached it (with the reason), and the sweep
repeats until none is left. What remains is a set of groups, each column linears feeding row
linears through rule-checked ops. Other linears stay replicated — or, when their output has no token
dims (AdaLN modulation: [B, 6·dim] from a dim x 6·dim weight), are column-sharded with an
all-gather of their output, which is exact and splits their weight too.

Head counts that do not divide by N are refused (the attention stays replicated, with the reason);
grouped K/V heads are sharded when the K/V head count divides by N; otherwise the K/V projections
stay replicated and each rank slices the K/V heads its query heads read (repeating them to the query's
head count first when SDPA would group them itself, `enable_gqa=True`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch
import torch.fx as fx

from npu_dit.passes.analysis.attention_ops import (
    is_linear,
    is_sdpa,
    node_value,
    sdpa_args,
)
from npu_dit.passes.analysis.attention import parameter_placeholders
from npu_dit.passes.analysis.dim_flow import _dim
from npu_dit.passes.analysis.symbolic import exprs_equal, size_expr
from npu_dit.passes.ops import semantics
from npu_dit.passes.analysis.module_paths import module_path


@dataclasses.dataclass(frozen=True)
class Shard:
    dim: int
    segs: tuple[int, ...]  # global sizes of the segments of `dim`, each split in N equal blocks
    origins: frozenset  # column linears whose split this is
    repeat: int = 1  # a narrow only: repeat each element of `dim` this often first (grouped K/V heads)

    @property
    def size(self) -> int:
        return sum(self.segs)


class Conflict(Exception):
    def __init__(self, reason: str, origins: frozenset) -> None:
        super().__init__(reason)
        self.reason, self.origins = reason, origins


@dataclasses.dataclass
class LinearPlacement:
    node: fx.Node
    module: str
    kind: str  # "column", "row", "gather" (column + all-gather), "replicated"
    reason: str
    weight: fx.Node | None
    bias: fx.Node | None
    segs: tuple[int, ...] = ()  # row: the input feature segments (weight columns regrouped per rank)


@dataclasses.dataclass
class FeaturePlan:
    world: int
    linears: dict[fx.Node, LinearPlacement]
    placements: dict[fx.Node, Any]  # node -> Shard | None | list (multi-output)
    resize: dict[fx.Node, tuple[int, int]]  # reshape-like node -> (out dim, global size) to make local
    split_sizes: dict[fx.Node, tuple[int, ...]]  # split along a sharded dim -> local piece sizes
    narrow: dict[tuple[fx.Node, fx.Node], Shard]  # (user, replicated input) -> slice it to the shard

    def summary(self) -> list[dict[str, Any]]:
        order = {n: i for i, n in enumerate(next(iter(self.linears)).graph.nodes)} if self.linears else {}
        return [
            {"module": p.module, "placement": p.kind, "reason": p.reason}
            for p in sorted(self.linears.values(), key=lambda p: order[p.node])
        ]


def _val(arg: Any) -> Any:
    return node_value(arg) if isinstance(arg, fx.Node) else arg


def _name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))




def _prod(sizes: Any) -> sympy.Expr:
    return sympy.Mul(*[size_expr(s) for s in sizes]) if len(sizes) else sympy.Integer(1)


def _static(size: Any) -> int | None:
    expr = size_expr(size)
    return int(expr) if not expr.free_symbols else None


class _Sweep:
    """One forward sweep under the current set of column candidates."""

    def __init__(self, gm: fx.GraphModule, world: int, columns: set[fx.Node], params: frozenset) -> None:
        self.gm, self.world, self.columns, self.params = gm, world, columns, params
        self.placements: dict[fx.Node, Any] = {}
        self.rows: dict[fx.Node, tuple[int, ...]] = {}
        self.resize: dict[fx.Node, tuple[int, int]] = {}
        self.split_sizes: dict[fx.Node, tuple[int, ...]] = {}
        self.narrow: dict[tuple[fx.Node, fx.Node], Shard] = {}
        self.conflicts: list[Conflict] = []

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.placements[node] = None
                continue
            if node.op == "output":
                sharded = [a for a in node.all_input_nodes if self.shard_of(a) is not None]
                if sharded:
                    self.conflicts.append(Conflict("reaches the graph output", self.origins(sharded)))
                continue
            inputs = [a for a in node.all_input_nodes if self.shard_of(a) is not None]
            if not inputs and not (is_linear(node) and node in self.columns):
                self.placements[node] = None
                continue
            try:
                self.placements[node] = self.visit(node)
            except Conflict as conflict:
                self.conflicts.append(conflict)
                self.placements[node] = None

    # -- helpers --------------------------------------------------------------------------------
    def shard_of(self, arg: Any) -> Shard | None:
        value = self.placements.get(arg) if isinstance(arg, fx.Node) else None
        if isinstance(value, list):
            return next((v for v in value if v is not None), None)
        return value

    def origins(self, nodes: list[fx.Node]) -> frozenset:
        found: set = set()
        for n in nodes:
            value = self.placements.get(n)
            for v in value if isinstance(value, list) else [value]:
                if v is not None:
                    found |= v.origins
        return frozenset(found)

    def fail(self, node: fx.Node, why: str) -> Conflict:
        sharded = [a for a in node.all_input_nodes if self.shard_of(a) is not None]
        where = module_path(node) or "the graph"
        return Conflict(f"its split reaches {_name(node)} in {where}: {why}", self.origins(sharded))

    # -- rules ----------------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> Any:
        sem = semantics(node)
        if is_linear(node):
            return self.rule_linear(node)
        if sem is None:
            raise self.fail(node, "an op without a tensor-parallel rule")
        if sem.mutates:
            written = [sem.call.args.get(n) for n in sem.mutates]
            if any(isinstance(w, fx.Node) and self.shard_of(w) is not None for w in written):
                raise self.fail(node, "an in-place write into split features")
        kind, x = sem.kind, sem.call.args.get("input")
        if kind == "getitem" and isinstance(self.placements.get(node.args[0]), list):
            return self.placements[node.args[0]][node.args[1]]
        value = node_value(node)
        if not isinstance(value, torch.Tensor) and not (isinstance(value, (list, tuple)) and value
                                                          and all(isinstance(v, torch.Tensor) for v in value)):
            if kind == "size":
                src = self.shard_of(x)
                if src is not None and sem.dim == src.dim:
                    raise self.fail(node, "reads the size of the sharded dim")
                return None
            if kind in ("symbolic", "effect"):
                return None
            raise self.fail(node, "an op without a tensor-parallel rule")
        if kind == "attention" and is_sdpa(node):
            return self.rule_sdpa(node)
        if kind == "getitem":
            return self.rule_getitem(node)
        if kind == "same":  # a second tensor operand (type_as, to) only gives a dtype
            return self.shard_of(x)
        if kind == "permute":
            src = self.shard_of(x)
            return dataclasses.replace(src, dim=list(sem.dims).index(src.dim))
        if kind in ("reshape", "expand"):
            return self.rule_reshape(node, sem)
        if kind == "cat":
            return self.rule_cat(node, sem)
        if kind == "split":
            return self.rule_split(node, sem)
        if kind == "unbind":
            src = self.shard_of(x)
            if sem.dim == src.dim:
                raise self.fail(node, "unbind along the sharded dim")
            out = dataclasses.replace(src, dim=src.dim - (1 if sem.dim < src.dim else 0))
            return [out for _ in node_value(node)]
        if kind == "stack":
            return self.rule_stack(node, sem)
        if kind in ("view_as_complex", "view_as_real"):  # the pair dim of complex numbers is the last
            src = self.shard_of(x)
            if kind == "view_as_complex" and src.dim >= node_value(node).dim():
                raise self.fail(node, "complex pairs along the sharded dim")
            return src
        if kind == "matmul":
            return self.rule_matmul(node, x, sem.call.args.get("other", sem.call.args.get("mat2")))
        if kind == "mix":
            return self.rule_mixing(node, sem)
        if kind == "reduce":
            return self.rule_reduce(node, sem)
        if kind == "pointwise":
            return self.rule_pointwise(node, sem)
        raise self.fail(node, "an op without a tensor-parallel rule")

    def rule_linear(self, node: fx.Node) -> Shard | None:
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        src = self.shard_of(x)
        for other in (weight, bias):
            if self.shard_of(other) is not None:
                raise self.fail(node, "a sharded weight")
        if src is not None:
            if src.dim != node_value(x).dim() - 1:
                raise self.fail(node, "a linear over a tensor sharded on another dim than its features")
            if weight not in self.params or len(weight.users) != 1:
                raise self.fail(node, "a row-sharded linear whose weight is not a parameter of its own")
            self.rows[node] = src.segs
            return None  # partial sums, all-reduced right after: replicated
        if node in self.columns:
            features = int(node_value(node).shape[-1])
            return Shard(node_value(node).dim() - 1, (features,), frozenset({node}))
        return None

    def rule_reshape(self, node: fx.Node, sem: Any) -> Shard:
        src_node = sem.call.args["input"]
        src = self.shard_of(src_node)
        for other in node.all_input_nodes:
            if other is not src_node and self.shard_of(other) is not None:
                raise self.fail(node, "a second sharded operand")
        in_shape, out_shape = list(node_value(src_node).shape), list(node_value(node).shape)
        if sem.kind == "expand":
            dim = src.dim + len(out_shape) - len(in_shape)
            self._check_size_arg(node, dim, src.size)
            self.resize[node] = (dim, src.size)
            return dataclasses.replace(src, dim=dim)
        size, inner_in = sympy.Integer(src.size), _prod(in_shape[src.dim + 1:])
        for j in range(len(out_shape)):
            if _static(out_shape[j]) == 1 or not exprs_equal(_prod(out_shape[j:]), size * inner_in):
                continue
            out_j = _static(out_shape[j])
            if out_j is None:
                break
            if out_j == src.size:
                segs = src.segs
            elif src.size % out_j == 0:  # split: heads outermost, e.g. F -> (H, D)
                q = src.size // out_j
                if any(s % q or (s // q) % self.world for s in src.segs):
                    heads = [s // q if s % q == 0 else s / q for s in src.segs]
                    raise self.fail(node, f"{'+'.join(map(str, heads))} heads do not divide by tp_degree {self.world}")
                segs = tuple(s // q for s in src.segs)
            elif out_j % src.size == 0:  # merge: (H, D) -> F, the sharded dim outermost
                q = out_j // src.size
                if not exprs_equal(_prod(in_shape[src.dim + 1:]), q * _prod(out_shape[j + 1:])):
                    raise self.fail(node, "a reshape that interleaves the sharded dim with another")
                segs = tuple(s * q for s in src.segs)
            else:
                break
            if sem.call.target in _SIZED_RESHAPES:
                self._check_size_arg(node, j, out_j)
            self.resize[node] = (j, out_j)
            return Shard(j, segs, src.origins)
        raise self.fail(node, "a reshape that does not keep the split in whole blocks")

    def _check_size_arg(self, node: fx.Node, dim: int, size: int) -> None:
        slot = size_arg_slot(node, dim)
        if slot is None:
            return
        container, index = slot
        arg = container[index]
        if isinstance(arg, fx.Node) or (isinstance(arg, int) and arg not in (-1, size)):
            raise self.fail(node, f"the sharded dim's size is given as {arg}, not a constant")

    def rule_cat(self, node: fx.Node, sem: Any) -> Shard:
        pieces = list(sem.call.args["tensors"])
        dim = sem.dim
        shards = [self.shard_of(p) for p in pieces]
        if dim in {s.dim for s in shards if s is not None}:
            if any(s is None or s.dim != dim for s in shards):
                raise self.fail(node, "a concatenation of sharded and replicated features")
            segs = tuple(seg for s in shards for seg in s.segs)
            return Shard(dim, segs, frozenset().union(*(s.origins for s in shards)))
        first = next(s for s in shards if s is not None)
        for p, s in zip(pieces, shards):
            if s is None:
                raise self.fail(node, "a concatenation of sharded and replicated values")
            if s.dim != first.dim or s.segs != first.segs:
                raise self.fail(node, "a concatenation of differently sharded values")
        return Shard(first.dim, first.segs, frozenset().union(*(s.origins for s in shards)))

    def rule_stack(self, node: fx.Node, sem: Any) -> Shard:
        pieces = list(sem.call.args["tensors"])
        dim = sem.dim
        shards = [self.shard_of(p) for p in pieces]
        first = shards[0]
        if any(s is None or s.dim != first.dim or s.segs != first.segs for s in shards):
            raise self.fail(node, "a stack of differently sharded values")
        return Shard(first.dim + (1 if dim <= first.dim else 0), first.segs,
                     frozenset().union(*(s.origins for s in shards)))

    def rule_split(self, node: fx.Node, sem: Any) -> list[Shard]:
        x = sem.call.args.get("input", sem.call.args.get("tensor"))
        src = self.shard_of(x)
        dim = sem.dim
        pieces = list(node_value(node))
        if dim != src.dim:
            return [src for _ in pieces]
        if sem.call.target in _TENSOR_SPLITS:
            raise self.fail(node, "tensor_split along the sharded dim")
        sizes = [_static(p.shape[dim]) for p in pieces]
        out, k, local = [], 0, []
        for size in sizes:
            taken, total = [], 0
            while k < len(src.segs) and total < size:
                taken.append(src.segs[k])
                total += src.segs[k]
                k += 1
            if total != size:
                raise self.fail(node, "a split that cuts a sharded block (it does not fall between segments)")
            out.append(Shard(dim, tuple(taken), src.origins))
            local.append(size // self.world)
        sizes_arg = next((sem.call.args[n] for n in ("split_size_or_sections", "split_size") if n in sem.call.args), None)
        if len(set(local)) > 1 and sem.call.target in _SPLITS and not isinstance(sizes_arg, (list, tuple)):
            raise self.fail(node, "an even split of uneven segments")
        self.split_sizes[node] = tuple(local)
        return out

    def rule_getitem(self, node: fx.Node) -> Shard:
        src = self.shard_of(node.args[0])
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        ndim = node_value(node.args[0]).dim()
        if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in index):
            raise self.fail(node, "advanced indexing")
        consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for i in index:
            expanded.extend([slice(None)] * (ndim - consumed) if i is Ellipsis else [i])
        expanded.extend([slice(None)] * (ndim - sum(1 for i in expanded if i is not None)))
        d = out_d = 0
        for i in expanded:
            if i is None:
                out_d += 1
                continue
            if d == src.dim:
                if not (isinstance(i, slice) and i.start in (None, 0) and i.stop is None and i.step in (None, 1)):
                    raise self.fail(node, "a slice or index into the sharded dim")
                return dataclasses.replace(src, dim=out_d)
            if isinstance(i, slice):
                out_d += 1
            d += 1
        raise self.fail(node, "an index it cannot follow")

    def rule_sdpa(self, node: fx.Node) -> Shard:
        bound = sdpa_args(node)
        q, k, v, mask = bound["query"], bound["key"], bound["value"], bound["attn_mask"]
        shards = [self.shard_of(t) for t in (q, k, v)]
        ndim = node_value(q).dim()
        head_dim = ndim - 3
        qs = shards[0]
        if qs is not None and qs.dim == head_dim and len(qs.segs) == 1:
            off_heads = [t for t, s in zip((k, v), shards[1:]) if s is not None and (s.dim != head_dim or len(s.segs) != 1)]
            if off_heads:  # e.g. one K/V head: its split landed on head_dim; un-shard K/V only, not Q
                raise Conflict(f"its split reaches {_name(node)} in {module_path(node) or 'the graph'}: key/value "
                               f"split off their heads dim (too few K/V heads to divide)", self.origins(off_heads))
            # grouped K/V heads that could not be split (too few to divide by N): keep them replicated
            # and slice this rank's heads — of the K/V as they come when the model repeated them to the
            # query's head count, or repeated here first when SDPA groups them itself (enable_gqa)
            gqa = bound["enable_gqa"] is True
            for t, s in zip((k, v), shards[1:]):
                kv_heads = _static(node_value(t).shape[head_dim]) if s is None else None
                if kv_heads == qs.size:
                    self.narrow[(node, t)] = Shard(head_dim, qs.segs, frozenset())
                elif gqa and kv_heads and qs.size % kv_heads == 0:
                    self.narrow[(node, t)] = Shard(head_dim, qs.segs, frozenset(), repeat=qs.size // kv_heads)
            shards = [qs] + [qs if s is None and (node, t) in self.narrow else s for t, s in zip((k, v), shards[1:])]
        if any(s is None or s.dim != head_dim or len(s.segs) != 1 for s in shards):
            raise self.fail(node, "attention whose query, key and value are not all split by heads")
        if isinstance(mask, fx.Node):
            mshard = self.shard_of(mask)
            mshape = node_value(mask).shape
            mdim = head_dim - (ndim - len(mshape))
            if mshard is not None:
                if mshard.dim != mdim or mshard.segs != shards[0].segs:
                    raise self.fail(node, "a mask sharded on another dim")
            elif mdim >= 0 and _static(mshape[mdim]) != 1:
                self.narrow[(node, mask)] = Shard(mdim, shards[0].segs, frozenset())
        return shards[0]

    def rule_matmul(self, node: fx.Node, a: Any, b: Any) -> Shard:
        out_ndim = node_value(node).dim()
        sa, sb = self.shard_of(a), self.shard_of(b)
        target: Shard | None = None
        for arg, s in ((a, sa), (b, sb)):
            if s is None:
                continue
            nd = node_value(arg).dim()
            if nd < 3 or s.dim >= nd - 2:
                raise self.fail(node, "a matmul that contracts or keeps the sharded dim as a matrix dim")
            out = dataclasses.replace(s, dim=s.dim + out_ndim - nd)
            if target is not None and (target.dim != out.dim or target.segs != out.segs):
                raise self.fail(node, "a matmul of differently sharded operands")
            target = out if target is None else dataclasses.replace(target, origins=target.origins | out.origins)
        for arg, s in ((a, sa), (b, sb)):
            if s is None:
                self._broadcast_operand(node, arg, target)
        return target

    def _broadcast_operand(self, node: fx.Node, arg: Any, target: Shard) -> None:
        """A replicated operand meeting the sharded dim: broadcast (size 1) or sliced to the shard."""
        value = _val(arg)
        if not isinstance(value, torch.Tensor):
            return
        out_ndim = node_value(node).dim()
        d = target.dim - (out_ndim - value.dim())
        if d < 0 or _static(value.shape[d]) == 1:
            return
        if _static(value.shape[d]) != target.size:
            raise self.fail(node, "a replicated operand of another size along the sharded dim")
        self.narrow[(node, arg)] = Shard(d, target.segs, frozenset())

    def rule_pointwise(self, node: fx.Node, sem: Any) -> Shard:
        out_ndim = node_value(node).dim()
        target: Shard | None = None
        tensors = sem.tensor_inputs()
        for arg in tensors:
            s = self.shard_of(arg)
            if s is None:
                continue
            out = dataclasses.replace(s, dim=s.dim + out_ndim - node_value(arg).dim())
            if target is not None and (target.dim != out.dim or target.segs != out.segs):
                raise self.fail(node, "operands sharded differently")
            target = out if target is None else dataclasses.replace(target, origins=target.origins | out.origins)
        for arg in tensors:
            if self.shard_of(arg) is None:
                self._broadcast_operand(node, arg, target)
        return target

    def rule_mixing(self, node: fx.Node, sem: Any) -> Shard:
        x = sem.call.args["input"]
        src = self.shard_of(x)
        mixed = sem.dims if sem.dims is not None else tuple(range(node_value(x).dim()))
        if src is None or src.dim in mixed:
            raise self.fail(node, "it normalises or mixes over the sharded feature dim")
        for other in node.all_input_nodes:
            if other is not x and self.shard_of(other) is not None:
                raise self.fail(node, "a sharded norm weight")
        return src

    def rule_reduce(self, node: fx.Node, sem: Any) -> Shard:
        x = sem.call.args["input"]
        src = self.shard_of(x)
        if src is None or sem.dims is None or src.dim in sem.dims:
            raise self.fail(node, "a reduction over the sharded feature dim")
        dim = src.dim if sem.keepdim else src.dim - sum(1 for d in sem.dims if d < src.dim)
        return dataclasses.replace(src, dim=dim)


_SIZED_RESHAPES = {torch.Tensor.view, torch.reshape, torch.Tensor.reshape, torch.unflatten, torch.Tensor.unflatten}
_TENSOR_SPLITS = {torch.tensor_split, torch.Tensor.tensor_split}
_SPLITS = {torch.split, torch.Tensor.split}
_UNFLATTENS = {torch.unflatten, torch.Tensor.unflatten}


def size_arg_slot(node: fx.Node, dim: int) -> tuple[list, int] | None:
    """Where a reshape-like op gives the size of output dim `dim`: (mutable copy of its size list,
    index), or None when the op takes no sizes (flatten, squeeze, unsqueeze)."""
    sem = semantics(node)
    if sem is None or sem.kind not in ("reshape", "expand"):
        return None
    args = sem.call.args
    if sem.call.target in _UNFLATTENS:
        start = _dim(int(args["dim"]), node_value(args["input"]).dim())
        sizes = list(args["sizes"])
        return (sizes, dim - start) if start <= dim < start + len(sizes) else None
    name = next((n for n in ("size", "shape") if n in args), None)
    if name is None or not isinstance(args[name], (list, tuple)):
        return None
    sizes = list(args[name])
    return (sizes, dim) if dim < len(sizes) else None


def replace_sizes(node: fx.Node, sizes: list) -> None:
    """Give a reshape-like call new sizes (`size_arg_slot`'s list, edited)."""
    sem = semantics(node)
    x = sem.call.args["input"]
    if sem.call.target in _UNFLATTENS:
        node.args, node.kwargs = (x, sem.call.args["dim"], tuple(sizes)), {}
    elif node.op == "call_method":
        node.args, node.kwargs = (x, *sizes), {}
    else:
        node.args, node.kwargs = (x, list(sizes)), {}


def replace_split_sizes(node: fx.Node, local: tuple[int, ...]) -> None:
    """A split along the sharded dim takes this rank's piece sizes."""
    sem = semantics(node)
    name = next(n for n in ("split_size_or_sections", "split_size", "split_sizes") if n in sem.call.args)
    given = sem.call.args[name]
    sizes = list(local) if isinstance(given, (list, tuple)) else local[0]
    x = sem.call.args.get("input", sem.call.args.get("tensor"))
    node.args, node.kwargs = (x, sizes, sem.dim), {}


def _linear_params(node: fx.Node) -> tuple[Any, Any]:
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return weight, bias


def _candidate(node: fx.Node, params: frozenset, world: int) -> str | None:
    """Why a linear cannot be column-sharded at all, or None."""
    weight, bias = _linear_params(node)
    if weight not in params:
        return "its weight is not a parameter"
    if len(weight.users) != 1 or (isinstance(bias, fx.Node) and (bias not in params or len(bias.users) != 1)):
        return "its weight is shared with another op"
    features = _static(node_value(node).shape[-1])
    if features is None or features % world:
        return f"{features} output features do not divide by tp_degree {world}"
    return None


def feature_plan(gm: fx.GraphModule, world: int, *, max_sweeps: int = 64) -> FeaturePlan:
    params = frozenset(parameter_placeholders(gm))
    linears = [n for n in gm.graph.nodes if is_linear(n)]
    reasons: dict[fx.Node, str] = {}
    columns: set[fx.Node] = set()
    for node in linears:
        why = _candidate(node, params, world)
        if why is None:
            columns.add(node)
        else:
            reasons[node] = why
    sweep = _Sweep(gm, world, columns, params)
    for _ in range(max_sweeps):
        sweep = _Sweep(gm, world, columns, params)
        sweep.run()
        if not sweep.conflicts:
            break
        removed = False
        for conflict in sweep.conflicts:
            for origin in conflict.origins:
                if origin in columns:
                    columns.discard(origin)
                    reasons.setdefault(origin, conflict.reason)
                    removed = True
        if not removed:
            raise RuntimeError("tensor-parallel planning did not converge: " + sweep.conflicts[0].reason)
    else:
        raise RuntimeError("tensor-parallel planning did not converge")
    # column linears whose split reaches no row linear would be sharded for nothing: keep only those
    # in a group that ends in a row linear
    result: dict[fx.Node, LinearPlacement] = {}
    for node in linears:
        weight, bias = _linear_params(node)
        bias = bias if isinstance(bias, fx.Node) else None
        module = module_path(node)
        if node in sweep.rows:
            result[node] = LinearPlacement(node, module, "row", "reads column-sharded features: partial sums, one all-reduce",
                                           weight, bias, sweep.rows[node])
        elif node in columns:
            result[node] = LinearPlacement(node, module, "column", "output features split; they flow into a row-sharded linear",
                                           weight, bias)
        else:
            why = reasons.get(node, "")
            out = node_value(node).shape
            small = all(_static(s) is not None for s in out[1:])
            if _candidate(node, params, world) is None and small:
                result[node] = LinearPlacement(
                    node, module, "gather",
                    f"column + all-gather: its output {list(out)} has no token dims",
                    weight, bias)
            else:
                if _candidate(node, params, world) is None:
                    why += "; its output has token dims, too large to all-gather"
                result[node] = LinearPlacement(node, module, "replicated", why, weight, bias)
    return FeaturePlan(world, result, sweep.placements, sweep.resize, sweep.split_sizes, sweep.narrow)
