"""Tensor parallelism as a graph rewrite (Megatron column/row sharding, derived from the graph).

Before (every rank holds and computes everything):

    q = to_q(x); k = to_k(x); v = to_v(x)                       # [B, S, H*D]
    o = sdpa(unflatten(q, -1, (H, D)) ...)                      # [B, H, S, D]
    y = to_out(flatten(permute(o)))                             # [B, S, F]
    mod = linear(silu(temb), W_mod)                             # AdaLN: [B, 6F]

After, on rank r of N (the executor feeds this rank's weight shards):

    q = to_q(x, W_q[r])                                          # [B, S, H/N*D]
    o = sdpa(unflatten(q, -1, (H/N, D)) ...)                     # [B, H/N, S, D]
    y = tp_all_reduce(linear(flatten(permute(o)), W_out[:, r])) + b_out
    mod = tp_all_gather_last(linear(silu(temb), W_mod[r], b_mod[r]))

Which linears are column-, row-, gather-sharded or replicated is `feature_flow.feature_plan`'s
decision (no model names). A row linear reading a concatenation of column-sharded pieces (FLUX's
single-block `proj_out`) gets its weight columns regrouped per rank (`WeightShard.segs`). Constant
sizes of the sharded dim in reshapes/expands/splits (head counts) become local; replicated tensors
that meet a sharded dim (T5's per-head position bias) are sliced to this rank's block.

Preconditions: parameters are graph inputs (Dynamo's default); the feature dims are static.
Postconditions: `gm.meta[TP_META_KEY]` is the TensorParallelPlan; the weight placeholders and every
node's `meta["val"]` have this rank's local shapes.
Pipeline position: first sharding pass, before Ulysses (which then sees H/N heads per rank and
shards tokens within its own group).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from npu_dit.passes.analysis.attention_ops import node_value
from npu_dit.passes.analysis.feature_flow import (
    FeaturePlan,
    feature_plan,
    replace_sizes,
    replace_split_sizes,
    size_arg_slot,
)
from npu_dit.passes.infra import PassResult
from npu_dit.plans import TP_META_KEY, TensorParallelPlan, WeightShard
from npu_dit.runtime import collectives as C
from npu_dit.runtime.dist import ParallelContext


def _placeholder_index(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}


def _tensor_bytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, plan: FeaturePlan, ctx: ParallelContext) -> None:
        self.gm, self.graph, self.plan, self.ctx = gm, gm.graph, plan, ctx
        self.world, self.rank = ctx.world_size, ctx.rank
        self.index = _placeholder_index(gm)
        self.shards: dict[fx.Node, WeightShard] = {}
        self.counts: dict[str, int] = {}
        # the nodes of the graph before the rewrite: each gets its new shape by substitution (its old
        # value, its placement's dim at the local size), re-wired or not
        self.original = set(gm.graph.nodes)
        # inserted nodes whose value is the old value of an original node (the full output a row
        # linear's all-reduce and bias add restore, a gathered column output)
        self.same_as: set[fx.Node] = set()

    def bump(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def call(self, fn: Any, args: tuple, like: fx.Node, *, same_as: Any = None) -> fx.Node:
        """An inserted call; `same_as`: its value is that (pre-rewrite) value of an original node,
        which the refresh substitutes like any untouched node's."""
        node = self.graph.call_function(fn, args)
        if "nn_module_stack" in like.meta:
            node.meta["nn_module_stack"] = like.meta["nn_module_stack"]
        if same_as is not None:
            node.meta["val"] = same_as
            self.same_as.add(node)
        return node

    def shard_param(self, param: fx.Node, dim: int, segs: tuple[int, ...], module: str, what: str) -> None:
        value = node_value(param)
        self.shards[param] = WeightShard(self.index[param], f"{module}.{what}", dim, tuple(segs),
                                         tuple(int(s) for s in value.shape), value.element_size())

    def run(self) -> None:
        for node, p in self.plan.linears.items():
            if p.kind == "replicated":
                continue
            if p.kind in ("column", "gather"):
                features = int(node_value(node).shape[-1])
                self.shard_param(p.weight, 0, (features,), p.module, "weight")
                if p.bias is not None:
                    self.shard_param(p.bias, 0, (features,), p.module, "bias")
                self.bump(f"{p.kind}_linear")
                if p.kind == "gather":
                    with self.graph.inserting_after(node):
                        gathered = self.call(C.tp_all_gather_last, (node, self.world, self.ctx.group_name), node,
                                             same_as=node.meta.get("val"))
                    node.replace_all_uses_with(gathered, delete_user_cb=lambda u: u is not gathered)
                    self.bump("all_gather")
            elif p.kind == "row":
                self.shard_param(p.weight, 1, p.segs, p.module, "weight")
                self.bump("row_linear")
                node.args = (node.args[0], p.weight)
                node.kwargs = {}
                full = node.meta.get("val")  # the linear's output before the rewrite
                with self.graph.inserting_after(node):
                    reduced = self.call(C.tp_all_reduce, (node, self.ctx.group_name), node, same_as=full)
                out = reduced
                if p.bias is not None:
                    with self.graph.inserting_after(reduced):
                        out = self.call(torch.add, (reduced, p.bias), node, same_as=full)
                node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not reduced)
                self.bump("all_reduce")
        for node, (dim, size) in self.plan.resize.items():
            slot = size_arg_slot(node, dim)
            if slot is None:
                continue
            sizes, i = slot
            if sizes[i] == -1:
                continue
            sizes[i] = size // self.world
            replace_sizes(node, sizes)
            self.bump("local_size")
        for node, local in self.plan.split_sizes.items():
            replace_split_sizes(node, local)
            self.bump("local_size")
        for (user, inp), shard in self.plan.narrow.items():
            with self.graph.inserting_before(user):
                full = inp
                if shard.repeat > 1:  # grouped K/V heads: the query's head count first, then this rank's
                    full = self.call(torch.repeat_interleave, (inp, shard.repeat, shard.dim), user)
                local = self.call(C.feature_block, (full, shard.dim, shard.segs, self.world, self.rank), user)
            user.replace_input_with(inp, local)
            self.bump("localize")


def refresh_tp_shapes(gm: fx.GraphModule, shards: list[WeightShard], world: int,
                      rewriter: "_Rewriter | None" = None) -> None:
    """Every node's meta["val"] becomes this rank's value: the sharded parameters get local shapes;
    every node of the graph before the rewrite (re-wired or not) gets its old value with its split
    dim (the feature plan's placement) at the local size, inserted calls that restore an old value
    take it, `feature_block` has a shape rule, anything else is fake-run (`fake_prop.refresh`). Tensor parallelism
    changes static feature sizes only, so this stays in Dynamo's own ShapeEnv: its symbols and the
    facts it proved about them (which token lengths are equal) stay valid for the passes after this
    one (Ulysses' token analysis)."""
    import os

    from npu_dit.passes.analysis.attention_ops import graph_fake_mode
    from torch.utils._pytree import tree_leaves

    from npu_dit.passes.analysis.fake_prop import Resize, refresh, repropagate
    from npu_dit.passes.collective_meta import TP_RULES

    by_index = {s.index: s for s in shards}
    mode = graph_fake_mode(gm)
    values = []
    local_weights: dict[tuple, torch.Tensor] = {}  # shards of one shape share one fake value (read only)
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        value = node_value(node)
        shard = by_index.get(i)
        if shard is not None:
            sizes = list(value.shape)
            sizes[shard.dim] = sum(shard.segs) // world
            key = (tuple(sizes), value.dtype, value.device)
            if key not in local_weights:
                with mode:
                    local_weights[key] = torch.empty(sizes, dtype=value.dtype, device=value.device)
            value = local_weights[key]
        values.append(value)
    if rewriter is None or os.environ.get("NPU_DIT_FULL_REFRESH") == "1":
        repropagate(gm, values)
        return
    placements = rewriter.plan.placements

    def rename(node: fx.Node) -> Resize | None:
        """Every node of the graph before the rewrite, re-wired or not, computes its placement's
        local piece of what it computed before (the plan's rules proved that; a re-wired input has
        the value its old one had, or the block of it the plan's placement gives): its old value
        with the split dim at the local size. Inserted nodes that restore an old value take it."""
        if node in rewriter.same_as:
            return Resize({}, [{}])
        if node not in rewriter.original:
            return None
        linear = rewriter.plan.linears.get(node)
        if linear is not None and linear.kind == "gather":  # column-split, gathered after it
            value = node_value(node)
            return Resize({}, [{value.dim() - 1: int(value.shape[-1]) // world}])
        placement = placements.get(node)
        value = node.meta.get("val")
        leaves = [value] if isinstance(value, torch.Tensor) else [v for v in tree_leaves(value) if isinstance(v, torch.Tensor)]
        outputs = placement if isinstance(placement, list) else [placement] * len(leaves)
        if len(outputs) != len(leaves):
            return None
        return Resize({}, [{} if p is None else {p.dim: p.size // world} for p in outputs])

    refresh(gm, values, None, rename, TP_RULES, mode=mode)


def tensor_parallel_pass(gm: fx.GraphModule, *, ctx: ParallelContext, release_weights: bool = True) -> PassResult:
    plan = feature_plan(gm, ctx.world_size)
    order = _order(gm)
    placements = [(p.module, p.kind, p.reason) for p in sorted(plan.linears.values(), key=lambda p: order[p.node])]
    rewriter = _Rewriter(gm, plan, ctx)
    rewriter.run()
    shards = sorted(rewriter.shards.values(), key=lambda s: s.index)
    params = _params(gm)
    total = sum(_tensor_bytes(node_value(n)) for n in params)
    sharded = sum(_tensor_bytes(node_value(n)) for n in rewriter.shards)
    local = total - sharded + sum(_tensor_bytes(node_value(n)) // ctx.world_size for n in rewriter.shards)
    tp_plan = TensorParallelPlan(ctx.world_size, ctx.rank, shards, placements, release_weights, total, local)
    gm.meta[TP_META_KEY] = tp_plan
    if not shards:
        return PassResult(gm, modified=False, notes=tp_plan.describe() + ["no linear could be sharded"])
    gm.graph.lint()
    gm.recompile()
    refresh_tp_shapes(gm, shards, ctx.world_size, rewriter)
    return PassResult(gm, modified=True, counts=rewriter.counts, notes=tp_plan.describe())


def _order(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def _params(gm: fx.GraphModule) -> frozenset:
    from npu_dit.passes.analysis.attention import parameter_placeholders

    return frozenset(parameter_placeholders(gm))
