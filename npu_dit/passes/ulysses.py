"""Ulysses sequence parallelism as a graph rewrite (DeepSpeed-Ulysses, with Ulysses-Anything).

Before (one rank computes everything):

    q = permute(rope(norm(cat(add_q_proj(txt), to_q(img)))))          # [B, H, S_txt + S_img, D]
    o = scaled_dot_product_attention(q, k, v, mask)
    ... o ...

After, on rank r of P (inputs arrive sequence-sharded from the executor):

    q = permute(rope(norm(cat(add_q_proj(txt_r), to_q(img_r)))))      # [B, H, s_r, D]   s_r = local tokens
    qh = seq_to_heads_wait(seq_to_heads_start(pad_heads(q), lens))     # [B, H/P, S, D]   all-to-all
    ...same for k, v; mask key axis gathered...
    oh = scaled_dot_product_attention(qh, kh, vh, mask_full)
    o = strip_heads(heads_to_seq_wait(heads_to_seq_start(oh, lens)))  # [B, H, s_r, D]   all-to-all back
    ... o ...

Sharding propagates forward from the inputs, as DTensor does: a value is *local* in the sharded
streams it derives from. Where a replicated tensor that carries a sharded stream (a RoPE table the
graph builds from `img_shapes`, say) meets a local one, it is sliced to this rank's chunk (Replicate ->
Shard, no communication). A replicated stream (static text) needs no exchange before attention, only a
local head slice, and an all-gather over heads after. Sequence lengths of any size (uneven split
sizes, computed in the graph from the global lengths the executor passes in) and head counts of any
size (zero heads padded to a multiple of P, stripped after) give the serial result.

Tokens patchified inside the graph (no input carries them) are a grid stream: cut to this rank's
whole patch rows where they are made, gathered before the unpatchify (docs/ARCHITECTURE.md, Ulysses).

Preconditions: the token dims are symbolic (dynamic=True); attention is SDPA in BHSD layout; each
q/k/v sequence holds at most one run of sharded tokens. Anything else raises, and the runner falls
back to the captured graph.
Postconditions: `gm.meta["npu_dit.sharding"]` holds the ShardingPlan the executor applies.
Pipeline position: first rewriting pass (async scheduling and attention lowering work on its output).
"""

from __future__ import annotations

import operator
import os
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

from npu_dit.passes.analysis.attention_ops import graph_fake_mode, is_sdpa, node_value, sdpa_args
from npu_dit.passes.analysis.dim_flow import conv_params
from npu_dit.passes.analysis.symbolic import exprs_equal, size_expr
from npu_dit.passes.analysis.token_dims import TokenDims, token_dims
from npu_dit.passes.infra import PassResult, Refusal
from npu_dit.passes.ops import semantics
from npu_dit.passes.ulysses_plan import OutputGather, ShardingPlan, plan_streams
from npu_dit.plans import SHARDING_META_KEY
from npu_dit.runtime import collectives as C
from npu_dit.runtime.dist import ParallelContext

# op kinds (passes/ops) that take a stretch of a dim: the tokens they drop are not lost to a reduction
SLICING_KINDS = {"getitem", "split", "unbind", "narrow", "select"}
# creations whose values do not depend on positions along the dims they create
CONSTANT_FILLS = {
    torch.ones, torch.zeros, torch.full, torch.empty, torch.Tensor.new_ones, torch.Tensor.new_zeros,
    torch.Tensor.new_full, torch.Tensor.new_empty, torch.ops.aten.full.default, torch.ops.aten.zeros.default,
    torch.ops.aten.ones.default,
}
FLATTEN = {torch.flatten, torch.Tensor.flatten}


def _kind(node: fx.Node) -> str | None:
    sem = semantics(node)
    return None if sem is None else sem.kind
_SYM_ARITHMETIC = {
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.neg, operator.mod,
    torch.sym_max, torch.sym_min, torch.sym_sum,
}


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


class _Run:
    """A stretch of a sequence dim: tokens of one or more streams, local (sharded) or full."""

    def __init__(self, streams: tuple[int, ...], local: bool) -> None:
        self.streams, self.local = streams, local


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, tokens: TokenDims, plan: ShardingPlan, ctx: ParallelContext) -> None:
        self.gm, self.graph, self.tokens, self.plan, self.ctx = gm, gm.graph, tokens, plan, ctx
        self.world, self.rank = ctx.world_size, ctx.rank
        self.atoms = tokens.flow.atoms
        self.segment_of_atom = {s.atom: s.id for s in tokens.segments}
        self.stream_of_segment = {seg: s.id for s in plan.streams for seg in s.segments}
        self.sharded = {s.id for s in plan.streams if s.sharded}
        self.local: dict[fx.Node, frozenset[int]] = {}
        self.dead: list[fx.Node] = []  # original attention calls replaced by their rewrite
        self.replaced: dict[fx.Node, fx.Node] = {}  # a node cut to local rows where it was made -> the cut
        self.counts: dict[str, int] = {}
        self.notes: list[str] = []
        self.fake_mode = graph_fake_mode(gm)
        self.global_len: dict[int, fx.Node] = {}  # stream id -> its global length (input / full length)
        self.stream_len: dict[int, fx.Node] = {}  # stream id -> its length in this graph (local if sharded)
        self.chunks: dict[int, fx.Node] = {}  # sharded stream id -> per-rank chunk lengths
        self.grid_rows: dict[int, tuple[fx.Node, fx.Node]] = {}  # patch-grid stream -> (rows, cols)
        self.grid_symints: set[fx.Node] = set()  # lengths inserted for grid streams
        self.cache: dict[tuple, fx.Node] = {}
        self.setup_end: fx.Node | None = None
        self.stack: dict | None = None  # nn_module_stack given to inserted nodes
        self.empties: dict[tuple, torch.Tensor] = {}  # inserted calls' values by shape (`call`)
        self._written: set[fx.Node] | None = None  # tensors written in place, with their bases

    # -- small helpers ------------------------------------------------------------------------
    def bump(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def val(self, arg: Any) -> Any:
        return tree_map(lambda a: node_value(a) if isinstance(a, fx.Node) else a, arg)

    def call(self, fn: Callable, args: tuple, kwargs: dict | None = None, *, val: Any = None) -> fx.Node:
        """Insert `fn(*args)` at the graph's insert point, with meta["val"] computed on fake values."""
        node = self.graph.call_function(fn, args, kwargs or {})
        if self.stack is not None:  # inserted nodes belong to the module they serve (blocks, dumps)
            node.meta["nn_module_stack"] = self.stack
        if val is None:
            from npu_dit.passes.collective_meta import RULES

            # never add guards to Dynamo's ShapeEnv: they would become guards of the user's frame
            with self.fake_mode, self.fake_mode.shape_env.suppress_guards():
                rule = RULES.get(fn)
                if rule is not None:  # the refresh gives the true value: a shape rule is enough here
                    sizes, dtype, device = rule(*self.val(args), **self.val(kwargs or {}))
                    # the 57 sites of FLUX.1-dev make a dozen shapes: one fake value each (read only)
                    key = (tuple(s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in sizes), dtype, device)
                    val = self.empties.get(key)
                    if val is None:
                        val = self.empties[key] = torch.empty(sizes, dtype=dtype, device=device)
                else:
                    val = fn(*self.val(args), **self.val(kwargs or {}))
        node.meta["val"] = val
        return node

    def seq_segments(self, node: fx.Node, dim: int) -> list[int]:
        seq = self.tokens.flow.seq(node, dim) or ()
        return [self.segment_of_atom.get(a, -1) for a in seq]

    def streams_of(self, node: fx.Node) -> set[int]:
        value = self.tokens.flow.values.get(node)
        values = value if isinstance(value, list) else [value]
        found: set[int] = set()
        for v in values:
            if not isinstance(v, tuple):
                continue
            for seq in v:
                if seq is None:
                    continue
                for atom in self.atoms.normalize(seq):
                    seg = self.segment_of_atom.get(atom)
                    if seg is not None and seg in self.stream_of_segment:
                        found.add(self.stream_of_segment[seg])
        return found

    def runs(self, node: fx.Node, dim: int, local: frozenset[int]) -> list[_Run]:
        runs: list[_Run] = []
        for seg in self.seq_segments(node, dim):
            stream = self.stream_of_segment.get(seg)
            if stream is None:
                stream = self.internal_stream(node, dim, seg)
            is_local = stream in local
            if runs and runs[-1].local == is_local and (is_local or runs[-1].streams[-1] == stream):
                last = runs[-1]
                if last.streams[-1] != stream:
                    runs[-1] = _Run(last.streams + (stream,), is_local)
            else:
                runs.append(_Run((stream,), is_local))
        return runs

    def internal_stream(self, node: fx.Node, dim: int, seg: int) -> int:
        """Tokens no input carries as a token dim (a length-1 stream that Dynamo specialised): a
        replicated pseudo-stream of constant length, negative id."""
        size = self.tokens.segments[seg].size if seg >= 0 else None
        if size is None or size.free_symbols:
            raise Refusal(f"{node.name} dim {dim} holds tokens of no input stream")
        pseudo = -1 - seg
        self.stream_len.setdefault(pseudo, int(size))
        self.global_len.setdefault(pseudo, int(size))
        return pseudo

    # -- lengths ------------------------------------------------------------------------------
    def add_length_inputs(self) -> None:
        """Global lengths of the sharded streams become graph inputs (the executor passes them); every
        stream's length in this graph (local if sharded) is read off one of its inputs."""
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        with self.graph.inserting_after(placeholders[-1]):
            for stream in reversed(self.plan.sharded_streams):
                node = self.graph.placeholder(f"ulysses_global_len_{stream.id}")
                ph, dim = self.plan.length_input(stream)
                # the traced symbol's example value is the global length: reuse it (no new symbol)
                node.meta["val"] = node_value(placeholders[ph]).shape[dim]
                self.global_len[stream.id] = node
        self.plan.global_lengths = [s.id for s in self.plan.sharded_streams]
        first_op = next(n for n in self.graph.nodes if n.op != "placeholder")
        with self.graph.inserting_before(first_op):
            for stream in self.plan.streams:
                if stream.grid is not None:
                    self.add_grid_lengths(stream.id, placeholders, *stream.grid)
                    continue
                ph, dim = self.plan.length_input(stream)
                self.stream_len[stream.id] = self.call(torch.ops.aten.sym_size.int, (placeholders[ph], dim))
                if stream.sharded:
                    self.chunks[stream.id] = self.call(C.chunk_lengths, (self.global_len[stream.id], self.world))
                else:
                    self.global_len[stream.id] = self.stream_len[stream.id]
        self.setup_end = first_op

    def add_grid_lengths(self, stream: int, placeholders: list[fx.Node], ph: int, row_dim: int, col_dim: int,
                         patch_rows: int, patch_cols: int, lead: tuple = ()) -> None:
        """A patch-grid stream: rows = H // p and cols = W // p of its (whole) input (rows times the
        outer factors' patches, a video's frames, when there are some); rank j holds chunk j of the
        rows, so its tokens are rows_j * cols contiguous ones."""
        size = torch.ops.aten.sym_size.int
        rows = self.call(operator.floordiv, (self.call(size, (placeholders[ph], row_dim)), patch_rows))
        for dim, patch in lead:
            outer = self.call(operator.floordiv, (self.call(size, (placeholders[ph], dim)), patch))
            rows = self.call(operator.mul, (outer, rows))
        cols = self.call(operator.floordiv, (self.call(size, (placeholders[ph], col_dim)), patch_cols))
        self.grid_rows[stream] = (rows, cols)
        self.global_len[stream] = self.call(operator.mul, (rows, cols))
        self.chunks[stream] = self.call(C.grid_chunk_lengths, (rows, cols, self.world))
        self.stream_len[stream] = self.call(operator.getitem, (self.chunks[stream], self.rank))
        self.grid_symints |= {rows, cols, self.global_len[stream], self.stream_len[stream]}

    def cut_grid_source(self, node: fx.Node, streams: set[int]) -> None:
        """Where patch-grid tokens are made (the patch embedding's flatten, a table cropped to the
        grid), cut them to this rank's rows at once: every later use sees local tokens."""
        dims = [(d, self.seq_segments(node, d)) for d, _ in self.tokens.token_dims_of(node)]
        dims = [(d, segs) for d, segs in dims if any(self.stream_of_segment.get(s) in streams for s in segs)]
        if not isinstance(node_value(node), torch.Tensor) or not dims:
            raise Refusal(f"{self.where(node)} makes patch-grid tokens Ulysses cannot cut to this rank's rows")
        if self.narrow_patch_conv(node, dims):
            self.local[node] = self.local[node] | frozenset(streams)
            return
        users = list(node.users)
        cut = node
        with self.graph.inserting_before(node.next):
            for dim, segs in dims:
                if len(segs) != 1:  # the grid's tokens next to others (ones(B, image + text)): cut its run
                    cut = self.localize_runs(cut, dim, self.runs(node, dim, self.local.get(node, frozenset())),
                                             frozenset(streams))
                    continue
                grid = self.stream_of_segment[segs[0]]
                rows, cols = self.grid_rows[grid]
                cut = self.call(C.localize_rows, (cut, dim, rows, cols, self.world, self.rank, self.chunks[grid]))
                self.bump("localize")
        for user in users:
            user.replace_input_with(node, cut)
        self.local[cut] = self.local[node] | frozenset(streams)
        self.same_tokens(cut, node)
        self.replaced[node] = cut  # later rules about `node` (keyed by the analysis) apply to `cut`

    def narrow_patch_conv(self, node: fx.Node, dims: list[tuple[int, list[int]]]) -> bool:
        """Tokens made by `flatten(conv(x), d, d + 1)` from a convolution of whole patches along d
        (the patch embedding): the convolution is given only the input rows of this rank's patch
        rows, so no rank computes or holds the others' tokens. Anything else is cut once made."""
        sem = semantics(node)
        if sem is None or sem.call.target not in FLATTEN or len(dims) != 1 or len(dims[0][1]) != 1:
            return False
        conv = sem.call.args["input"]
        if not isinstance(conv, fx.Node) or getattr(semantics(conv), "kind", None) != "conv" or len(conv.users) != 1:
            return False
        out = node_value(conv)
        start, end = sem.call.args.get("start_dim", 0), sem.call.args.get("end_dim", -1)
        if not isinstance(out, torch.Tensor) or not isinstance(start, int) or not isinstance(end, int):
            return False
        start, end = start % out.dim(), end % out.dim()
        token_dim, (segment,) = dims[0]
        if start < 2 or end != start + 1 or token_dim != start:
            return False
        flow = self.tokens.flow
        rows_dims = flow.dims(conv)
        factors = flow.merged_factors(self.tokens.segments[segment].atom)
        if rows_dims is None or rows_dims[start] is None or not factors or (
                self.atoms.normalize(rows_dims[start]) != factors[0]):
            return False
        weight = node_value(conv.args[1] if len(conv.args) > 1 else conv.kwargs.get("weight"))
        stride, padding, dilation = conv_params(conv, out.dim() - 2)
        k = start - 2
        kernel = weight.shape[start] if isinstance(weight, torch.Tensor) else None
        if not (isinstance(kernel, int) and kernel == stride[k] and padding[k] == 0 and dilation[k] == 1):
            return False
        stream = self.stream_of_segment[segment]
        rows, cols = self.grid_rows[stream]
        counts = self.chunks[stream]
        x = conv.args[0]
        self.stack = conv.meta.get("nn_module_stack")
        with self.graph.inserting_before(conv):
            conv.replace_input_with(x, self.call(C.patch_rows_input,
                                                 (x, start, rows, kernel, self.world, self.rank, cols, counts)))
        with self.graph.inserting_after(conv):
            local = self.call(C.patch_rows_output, (conv, start, rows, self.world, self.rank, cols, counts))
        self.stack = None
        node.replace_input_with(conv, local)
        self.bump("patch_rows")
        return True

    def localize_lengths(self, node: fx.Node, streams: set[int]) -> None:
        """The grid's input enters whole, so lengths the graph reads off it are global: an op on local
        grid tokens given the token count (SD3 splits its joint output at `residual.shape[1]`, CogView4
        reshapes its RoPE input to `(*x.shape[:-1], 2, -1)`) gets this rank's count instead; a reshape
        that takes the grid apart (unpatchify) is not one of those: its tokens are gathered first. Any other length made from the grid's input dims is refused."""
        self.localize_split_sizes(node, streams)
        total = {s: node_value(self.global_len[s]).node.expr for s in streams
                 if isinstance(node_value(self.global_len[s]), torch.SymInt)}  # a static grid: no symbol to find
        symbols = frozenset().union(*(e.free_symbols for e in total.values()))

        def local(arg: Any) -> Any:
            value = node_value(arg) if isinstance(arg, fx.Node) else None
            if not isinstance(value, torch.SymInt) or not value.node.expr.free_symbols & symbols:
                return arg
            if arg in self.setup_nodes or arg in self.grid_symints:
                return arg  # lengths this pass computed itself
            expr = value.node.expr
            stream = next((s for s, e in total.items() if exprs_equal(expr, e, self.atoms.shape_env)), None)
            if stream is not None:
                return self.stream_len[stream]
            if arg.op == "call_function" and arg.target in _SYM_ARITHMETIC:
                key = ("local", arg)
                if key not in self.cache:
                    self.cache[key] = self.call(arg.target, fx.node.map_arg(arg.args, local))  # into sym_sum's list
                return self.cache[key]
            raise Refusal(f"{self.where(node)} uses a length of the patch grid's input ({expr}) on local tokens")

        with self.graph.inserting_before(node):
            node.args = fx.node.map_arg(node.args, local)
            node.kwargs = fx.node.map_arg(node.kwargs, local)

    def localize_split_sizes(self, node: fx.Node, streams: set[int]) -> None:
        """Constant sizes given to local grid tokens (a static grid: `split([8, 16])` of text and grid,
        CogVideoX; `reshape(B, 16, -1)` of the grid, ConsisID): a split piece or a reshape's output dim made
        only of `streams`' tokens gets this rank's count of them. Which tokens it holds is the analysis'
        record, not the constant's value (a constant cannot be told apart by its value)."""
        sem = semantics(node)
        out = self.tokens.flow.values.get(node)
        if sem is None or sem.kind not in ("split", "reshape") or out is None:
            return
        name = next((n for n in sem.sizes if isinstance(sem.call.args.get(n), (list, tuple))), None)
        sizes = sem.call.args.get(name) if name else None
        if sem.kind == "split":  # piece k's dims; its size along the split dim
            seqs = [v[sem.dim] if isinstance(v, tuple) and sem.dim < len(v) else None for v in out] \
                if isinstance(out, list) else []
        else:  # the output's dims, one size each (reshape / view; not unflatten's partial list)
            seqs = list(out) if isinstance(out, tuple) else []
        if sizes is None or len(sizes) != len(seqs):
            return
        new = list(sizes)
        held = self.local.get(sem.call.args.get("input"), frozenset())
        for k, seq in enumerate(seqs):
            owners = [self.stream_of_segment.get(s) for s in self.seq_segments_of(seq)]
            if type(sizes[k]) is int and sizes[k] != -1 and owners and all(o in streams for o in owners):
                new[k] = self.run_length(_Run(tuple(dict.fromkeys(owners)), True), gathered=False)
            elif (isinstance(sizes[k], fx.Node) and None not in owners and any(o in held for o in owners)
                  and any(o in self.sharded and o not in held for o in owners)):
                # this rank's tokens of some streams next to all tokens of others (ErnieImage's RoPE table: the
                # grid's rows cut where they are made, the text's positions whole until they meet local text):
                # no symbol says which part is which, the runs do
                runs = self.runs(node, sem.dim, held) if sem.kind == "split" else self.runs(node, k, held)
                new[k] = self._sum([self.run_length(r, gathered=False) for r in runs],
                                   ("mixed", tuple((r.streams, r.local) for r in runs)))
        if new == list(sizes):
            return
        if any(a is sizes or (isinstance(a, (list, tuple)) and list(a) == list(sizes)) for a in node.args):
            node.args = tuple(new if a is sizes or (isinstance(a, (list, tuple)) and list(a) == list(sizes)) else a
                              for a in node.args)
        elif list(node.args[1:]) == list(sizes):  # varargs sizes: x.reshape(B, 16, -1)
            node.args = (node.args[0], *new)
        elif any(v is sizes or v == sizes for v in node.kwargs.values()):
            node.kwargs = {k: new if v is sizes or v == sizes else v for k, v in node.kwargs.items()}
        else:
            raise Refusal(f"{self.where(node)} gives local grid tokens a constant size Ulysses cannot replace")
        self.bump("local_sizes")

    def seq_segments_of(self, seq: Any) -> list[int]:
        return [self.segment_of_atom.get(a, -1) for a in self.atoms.normalize(seq)] if seq else []

    def gather_tokens(self, t: fx.Node, streams: set[int], *, before: fx.Node) -> fx.Node:
        """Shard -> Replicate of the local tokens of `streams` in `t`, on every token dim: an all-gather
        (as an all-to-all: Gloo has no uneven all-gather) of each stream's local chunk. Where a dim
        holds local tokens of several streams side by side, each stream's part is gathered on its own
        (the all-gather lays chunks rank by rank; the graph's order is stream by stream); the other
        streams' tokens stay as they are. Used before a reshape takes a patch grid apart (unpatchify),
        where the graph returns tokens, and before an op that mixes or cuts positions of a stream that
        cannot be kept whole (`check_rules`)."""
        result = t
        value = node_value(t)
        with self.graph.inserting_before(before):
            for dim, _ in self.tokens.token_dims_of(t):
                runs = self.runs(t, dim, self.local.get(t, frozenset()))
                if not any(r.local and set(r.streams) & streams for r in runs):
                    continue
                parts = []
                for run, piece in zip(runs, self.split_runs(result, dim, runs, gathered=False)):
                    if not (run.local and set(run.streams) & streams):
                        parts.append(piece)
                        continue
                    singles = [_Run((s,), True) for s in run.streams]
                    for single, part in zip(singles, self.split_runs(piece, dim, singles, gathered=False)):
                        stream = single.streams[0]
                        if stream not in streams:
                            parts.append(part)
                            continue
                        start = self.call(C.gather_seq_start, (part, dim, self.lengths_of((stream,)), self.world,
                                                               self.ctx.group_name))
                        parts.append(self.call(C.gather_seq_wait, (start, dim, value.dtype)))
                        self.bump("all_gather")
                result = parts[0] if len(parts) == 1 else self.call(torch.cat, (parts, dim))
        self.local[result] = self.local.get(t, frozenset()) - frozenset(streams)
        self.same_tokens(result, t)
        return result

    def replicable(self, streams: frozenset[int]) -> bool:
        """Whether a refusal caused by `streams` can be retried with them kept whole: some other stream
        stays sharded, and none of them is a patch grid (its tokens belong to no input to keep whole)."""
        grids = {s.id for s in self.plan.streams if s.grid is not None}
        return bool(streams) and streams < self.sharded and not streams & grids

    def gather_or_refuse(self, node: fx.Node, found: list[tuple[fx.Node, frozenset[int], str]]) -> None:
        """`node` mixes or cuts positions of the local tokens of some streams (`found`: the input as the
        analysis knows it, the streams, the reason). Streams that can be kept whole are (the pass is
        retried with them replicated: no collective, as the serial graph); the others are gathered
        into `node`'s input, so it runs on whole tokens, exactly as in the serial graph, and its result
        is whole (sliced again where it meets local tokens). Tokens written in place are never gathered
        (the pass refuses)."""
        for _, streams, reason in found:
            if self.replicable(streams):
                raise StreamRefusal(reason, streams)
        wanted: dict[fx.Node, set[int]] = {}
        for inp, streams, _ in found:
            wanted.setdefault(self.replaced.get(inp, inp), set()).update(streams)
        # a gathered input is a copy: where `node`'s result or its input is written in place (`h[:, 0] = v`
        # is a write through the view `h[:, 0]`), the write would miss the tensor it is meant for
        for inp, streams, reason in found:
            if any(self.written_in_place(t) for t in (node, inp, self.replaced.get(inp, inp))):
                raise StreamRefusal(f"{reason}, and those tokens are written in place", streams)
        stack, self.stack = self.stack, node.meta.get("nn_module_stack")  # the gathers serve `node`'s module
        for actual, streams in wanted.items():
            node.replace_input_with(actual, self.gather_tokens(actual, streams, before=node))
            self.bump("gather_before_mixing")
        self.stack = stack

    def _sum(self, nodes: list[fx.Node], key: tuple) -> fx.Node:
        if len(nodes) == 1:
            return nodes[0]
        if key not in self.cache:
            stack, self.stack = self.stack, None  # setup nodes belong to no block
            with self.graph.inserting_before(self.setup_end):
                total = nodes[0]
                for other in nodes[1:]:
                    total = self.call(operator.add, (total, other))
                self.cache[key] = total
            self.stack = stack
        return self.cache[key]

    def run_length(self, run: _Run, *, gathered: bool) -> fx.Node:
        """Length of a run: local tokens of its streams, or (gathered / replicated) all of them."""
        table = self.global_len if gathered or not run.local else self.stream_len
        return self._sum([table[s] for s in run.streams], ("len", run.streams, run.local, gathered))

    def lengths_of(self, streams: tuple[int, ...]) -> fx.Node:
        """Per-rank local lengths of a run of sharded streams (the all-to-all split sizes)."""
        if len(streams) == 1:
            return self.chunks[streams[0]]
        key = ("chunks", streams)
        if key not in self.cache:
            stack, self.stack = self.stack, None  # setup nodes belong to no block
            with self.graph.inserting_before(self.setup_end):
                self.cache[key] = self.call(C.add_lengths, tuple(self.chunks[s] for s in streams))
            self.stack = stack
        return self.cache[key]

    def split_runs(self, t: fx.Node, dim: int, runs: list[_Run], *, gathered: bool) -> list[fx.Node]:
        if len(runs) == 1:
            return [t]
        lengths = [self.run_length(r, gathered=gathered) for r in runs]
        # the pieces' shapes by rule: `t`'s recorded shape may still hold a patch grid's global length
        # where the tokens are already local (its shapes are refreshed after the rewrite)
        value = node_value(t)
        with self.fake_mode, self.fake_mode.shape_env.suppress_guards():
            val = tuple(torch.empty([node_value(n) if d == dim % value.dim() else size for d, size in enumerate(value.shape)],
                                    dtype=value.dtype, device=value.device) for n in lengths)
        pieces = self.call(torch.split, (t, lengths, dim), val=val)
        return [self.call(operator.getitem, (pieces, i)) for i in range(len(runs))]

    # -- propagation --------------------------------------------------------------------------
    def run(self) -> None:
        # what each node was called with: a node whose arguments are the same objects after the
        # rewrite is untouched, and its new shapes are its old ones with local/global lengths put in
        self.original_args = {n: (n.args, n.kwargs) for n in self.graph.nodes}
        placeholder_index = {n: i for i, n in enumerate(n for n in self.graph.nodes if n.op == "placeholder")}
        self.add_length_inputs()
        self.setup_nodes = set()
        for node in self.graph.nodes:
            if node is self.setup_end:
                break
            self.setup_nodes.add(node)
        for node in list(self.graph.nodes):
            if node.op == "placeholder":
                # a patch grid's tokens enter whole (an input carrying them is a table, sliced where it
                # meets them); every other sharded stream arrives as this rank's chunk from the executor
                # (an input the plan keeps whole, a table of several streams' positions, is cut where it meets them)
                index = placeholder_index.get(node, -1)  # (-1: a length it added)
                self.local[node] = frozenset(s for ph, _, s in self.plan.shard_inputs if ph == index)
            elif node.op == "output":
                self.plan_outputs(node)
            elif node.op in ("call_function", "call_method") and node not in self.setup_nodes:
                if is_sdpa(node):
                    self.rewrite_attention(node)
                else:
                    self.propagate(node)
        for node in self.dead:
            self.graph.erase_node(node)

    def undo(self) -> None:
        """Put the graph back as `run` found it: inserted nodes erased, original arguments restored."""
        inserted = [n for n in self.graph.nodes if n not in self.original_args]
        for node in inserted:
            node.args, node.kwargs = (), {}
        for node, (args, kwargs) in self.original_args.items():
            node.args, node.kwargs = args, kwargs
        for node in reversed(inserted):
            self.graph.erase_node(node)

    def propagate(self, node: fx.Node) -> None:
        present = self.streams_of(node) & self.sharded
        self.check_rules(node)  # (may gather an input's tokens first: `gather_or_refuse`)
        carried = self.carried(node)
        self.globalize_values(node)
        lost = carried - present
        if carried & set(self.grid_rows) and not (lost & set(self.grid_rows) and _kind(node) == "reshape"):
            self.localize_lengths(node, carried & set(self.grid_rows))
        if lost and lost <= set(self.grid_rows) and _kind(node) == "reshape":
            # unpatchify: the grid's tokens are split back into rows and columns; gather them first
            inp = node.args[0]
            node.replace_input_with(inp, self.gather_tokens(inp, lost, before=node))
            carried -= lost
            lost = set()
        if lost and isinstance(node_value(node), torch.Tensor) and _kind(node) not in SLICING_KINDS:
            # the op folds the token dim away (a reshape merging it with another): it needs every token
            reason = f"{self.where(node)} drops the sharded token dim of stream(s) {sorted(lost)}"
            self.gather_or_refuse(node, [(inp, frozenset(lost) & self.local.get(inp, frozenset()), reason)
                                         for inp in self.value_inputs(node) if lost & self.local.get(inp, frozenset())])
            carried = self.carried(node)
            lost = set()
        self.check_placeable(node)
        local = present & carried
        for stream in present - carried:
            # a tensor the graph creates from a length: a constant fill (ones(B, s_img)) sized by the
            # local length is this rank's chunk; anything else (positions, a slice of a RoPE table) is
            # built at the global length below and sliced where it meets local tokens
            is_source = not any(stream in self.streams_of(i) for i in node.all_input_nodes)
            sem = semantics(node)
            if (is_source and sem is not None and sem.call.target in CONSTANT_FILLS
                    and self._sized_by_local_length(node, stream) and not self.feeds_only_masks(node)):
                local.add(stream)
        self.local[node] = frozenset(local)
        made = {s for s in present - carried if s in self.grid_rows}
        if made and not self.written_in_place(node):  # (a table written in place stays whole: `whole_write`)
            self.cut_grid_source(node, made)
            local |= made
        self.globalize_lengths(node, present - local)
        for inp in self.value_inputs(node):
            need = (self.streams_of(inp) & self.local[node]) - self.local.get(inp, frozenset())
            if need and isinstance(node_value(inp), torch.Tensor):
                self.stack = node.meta.get("nn_module_stack")
                node.replace_input_with(inp, self.localize(inp, frozenset(need), before=node))
                self.stack = None

    def carried(self, node: fx.Node) -> set[int]:
        """The sharded streams whose local tokens flow into `node`."""
        return set().union(*(self.local.get(inp, frozenset()) for inp in self.value_inputs(node)))

    def value_inputs(self, node: fx.Node) -> list[fx.Node]:
        """The inputs whose values flow into the node (`type_as`'s `other` gives only a dtype)."""
        sem = semantics(node)
        if sem is None or not sem.meta_only:
            return list(node.all_input_nodes)
        meta = {a for name in sem.meta_only for a in [sem.call.args.get(name)] if isinstance(a, fx.Node)}
        return [a for a in node.all_input_nodes if a not in meta]

    def length_keys(self, streams: set[int] | frozenset[int] | None = None) -> tuple[frozenset, tuple]:
        """What a size expression holds when it reads the length of the sharded `streams` (all when
        None): their symbols, and the lengths of those that have an expression instead (LTX-Video's
        `F*H*W`), which count only where the whole expression is in it (`F` alone is a global input)."""
        chosen = [s for s in self.plan.streams if s.sharded and (streams is None or s.id in streams)]
        return (frozenset().union(*(s.symbols for s in chosen)),
                tuple(e for s in chosen if not s.symbols for e in sorted(s.lengths, key=str)))

    @staticmethod
    def reads_length(expr: sympy.Expr, keys: tuple[frozenset, tuple]) -> bool:
        from npu_dit.passes.analysis.fake_prop import stand_in_for_keys

        symbols, exprs = keys
        if expr.free_symbols & symbols:
            return True
        return bool(exprs) and (any(expr.has(e) for e in exprs) or bool(stand_in_for_keys(expr, list(exprs))[1]))

    def globalize_values(self, node: fx.Node) -> None:
        """A length of a sharded stream used as a value (`h * h.shape[1]`, a fill value), not as a
        size, means the global length: the argument is recomputed from the global lengths (or the
        pass refuses). Sizes (a reshape's shape, a slice bound) stay local: they describe local tensors.
        An op with no rule that reads no sharded tokens (`check_rules` refuses the others) is a function
        of replicated values and lengths: it runs as in the serial graph, every length global, and its
        result is a full tensor, sliced where it meets local tokens."""
        sem = semantics(node)
        if sem is None and node not in self.tokens.flow.opaque_set:
            return
        if sem is not None and sem.kind in ("symbolic", "size", "effect"):
            return
        keys = self.length_keys()
        sizes = sem.size_arguments() if sem is not None else ()

        def is_length_value(arg: Any) -> bool:
            value = node_value(arg) if isinstance(arg, fx.Node) else None
            return (isinstance(value, torch.SymInt) and arg not in sizes
                    and self.reads_length(value.node.expr, keys))

        if not any(is_length_value(a) for a in node.all_input_nodes):
            return
        with self.graph.inserting_before(node):
            swap = lambda a: self.global_symint(a, keys) if is_length_value(a) else a  # noqa: E731
            node.args = fx.node.map_arg(node.args, swap)
            node.kwargs = fx.node.map_arg(node.kwargs, swap)
        self.bump("global_values")

    def alias_chain(self, node: fx.Node) -> list[fx.Node]:
        """`node` and the tensors it is a view of (a write into a view writes into its base)."""
        chain = [node]
        while True:
            sem = semantics(chain[-1])
            base = sem.call.args.get("input") if sem is not None and sem.aliases else None
            if not isinstance(base, fx.Node) or base in chain:
                return chain
            chain.append(base)

    def where(self, node: fx.Node) -> str:
        from npu_dit.passes.analysis.module_paths import module_path, source_line

        path, line = module_path(node), source_line(node)
        return f"{_op_name(node)} ({node.name}{' in ' + path if path else ''}{', at ' + line if line else ''})"

    def holds_local_tokens(self, inp: Any, dim: int) -> frozenset[int]:
        """The sharded streams whose local tokens `inp` holds along `dim` (empty: none)."""
        if not isinstance(inp, fx.Node) or not self.local.get(inp):
            return frozenset()
        dims = self.tokens.flow.dims(inp)
        if dims is None or dim >= len(dims) or dims[dim] is None:
            return frozenset()
        segments = {self.segment_of_atom.get(a) for a in self.atoms.normalize(dims[dim])}
        return frozenset(self.stream_of_segment.get(s) for s in segments if s is not None) & self.local[inp]

    def sharded_streams_in(self, nodes: Any) -> frozenset[int]:
        """The sharded streams `nodes` hold, locally or whole."""
        return frozenset().union(*(self.local.get(n, frozenset()) | (self.streams_of(n) & self.sharded) for n in nodes))

    def check_rules(self, node: fx.Node) -> None:
        """Refuse whatever the rule table cannot prove exact on sharded tokens: an op with no rule,
        mixing positions along a sharded dim (softmax, cumsum, flip, a reduction, a contraction), or a
        slice that does not cut at a stream boundary."""
        flow = self.tokens.flow
        if node in flow.opaque_set and any(self.local.get(i) for i in node.all_input_nodes):
            raise StreamRefusal(f"{self.where(node)} has no sharding rule and reads sharded tokens",
                                frozenset().union(*(self.local.get(i, frozenset()) for i in node.all_input_nodes)))
        for written in flow.mutations.get(node, ()):
            chain = self.alias_chain(written)
            touched = [t for t in chain if self.local.get(t) or self.streams_of(t) & self.sharded]
            if touched and node in flow.aligned_writes and len(chain) == 1 and (
                    self.streams_of(written) & self.sharded) <= self.local.get(written, frozenset()):
                continue  # a write of local tokens into their own positions (RoPE on a slice of q)
            if touched and self.whole_write(node, chain):
                continue  # a table every rank builds whole, as the serial graph does
            if touched:
                raise StreamRefusal(f"{self.where(node)} writes in place into {touched[-1].name}, which holds tokens "
                                    f"of a sharded stream; Ulysses cannot prove an in-place write exact",
                                    self.sharded_streams_in(touched),
                                    fix="write the model without the in-place update (x = x + y, torch.where)")
        if node in flow.no_value and any(self.local.get(i) or self.streams_of(i) & self.sharded
                                         for i in node.all_input_nodes):
            raise StreamRefusal(f"{self.where(node)} returns nothing and reads sharded tokens (an effect Ulysses "
                                f"cannot see)", self.sharded_streams_in(node.all_input_nodes))
        found = []
        for inp, dim in flow.mixing.get(node, ()):
            if streams := self.holds_local_tokens(self.replaced.get(inp, inp), dim):
                found.append((inp, streams, f"{self.where(node)} combines positions along a sharded token dim (dim {dim})"))
        for inp, dim in flow.inexact_slices.get(node, ()):
            if streams := self.holds_local_tokens(self.replaced.get(inp, inp), dim):
                found.append((inp, streams, f"{self.where(node)} slices a sharded token dim (dim {dim}) inside a stream"))
        if found:
            self.gather_or_refuse(node, found)

    def whole_write(self, node: fx.Node, chain: list[fx.Node]) -> bool:
        """An in-place write (`table.data[:, n:].copy_(pos)`) into a tensor no rank holds locally, of values
        no rank holds locally, before anything else reads it: every rank writes the whole tensor as the
        serial graph does (it is cut where it meets local tokens, after the write)."""
        if any(self.local.get(t) or t in self.replaced for t in chain):
            return False
        if any(self.local.get(i) for i in node.all_input_nodes):
            return False
        order = {n: i for i, n in enumerate(self.original_args)}
        here = order.get(node)
        mutations = self.tokens.flow.mutations

        def earlier_write(user: fx.Node) -> bool:  # another whole write, or a view taken only to write
            sem = semantics(user)
            return user in mutations or (sem is not None and sem.aliases and all(u in mutations for u in user.users))

        for t in chain:
            for user in t.users:
                if user is node or user in chain:
                    continue
                if here is None or order.get(user, -1) < here and not earlier_write(user):
                    return False
        return True

    def written_in_place(self, node: fx.Node) -> bool:
        """Whether some op writes into `node` (or a view of it) in place."""
        if self._written is None:
            self._written = {t for w in self.tokens.flow.mutations.values() for base in w
                             for t in self.alias_chain(base)}
        return node in self._written

    def globalize_lengths(self, node: fx.Node, streams: set[int]) -> None:
        """A value built at full size for `streams` must use their global lengths: its SymInt
        arguments that mention a (now local) stream symbol are recomputed from the global lengths."""
        symbols, exprs = self.length_keys(streams or frozenset())
        for stream in set(streams or ()) & set(self.grid_rows):
            # a patch grid's lengths are expressions of its whole input's dims (no symbol of their own)
            length = node_value(self.global_len[stream])
            symbols |= length.node.expr.free_symbols if isinstance(length, torch.SymInt) else frozenset()
        if not symbols and not exprs:
            return
        keys = (symbols, exprs)

        def mentions(arg: Any) -> bool:
            value = node_value(arg) if isinstance(arg, fx.Node) else None
            return isinstance(value, torch.SymInt) and self.reads_length(value.node.expr, keys)

        if not any(mentions(a) for a in node.all_input_nodes):
            return
        with self.graph.inserting_before(node):
            node.args = fx.node.map_arg(node.args, lambda a: self.global_symint(a, keys) if mentions(a) else a)
            node.kwargs = fx.node.map_arg(node.kwargs, lambda a: self.global_symint(a, keys) if mentions(a) else a)
        self.bump("global_tables")

    def global_symint(self, node: fx.Node, keys: tuple[frozenset, tuple]) -> fx.Node:
        key = ("global", node)
        if key in self.cache:
            return self.cache[key]
        expr = node_value(node).node.expr
        stream = next((s for s in self.plan.streams if s.sharded and (
            expr in s.symbols or (not s.symbols and expr in s.lengths))), None)
        grid = next((s for s in self.grid_rows if node is self.stream_len.get(s)), None)
        sem = semantics(node) if node.op != "placeholder" else None
        if stream is not None:
            result = self.global_len[stream.id]
        elif grid is not None:
            result = self.global_len[grid]  # this rank's count of a patch grid's tokens -> all of them
        elif node in self.setup_nodes or node in self.grid_symints:
            result = node  # computed by this pass from the grid's whole input: global already
        elif sem is not None and sem.kind == "size" and sem.dim is not None and isinstance(
                sem.call.args.get("input"), fx.Node):
            # a size read off a tensor: global unless the tensor holds local tokens on that dim
            source, dim = sem.call.args["input"], sem.dim
            runs = self.runs(source, dim, self.local[source]) if self.local.get(source) else []
            if not any(r.local for r in runs):
                result = node
            else:
                result = self.run_length(_Run(tuple(st for r in runs for st in r.streams), False), gathered=True)
        elif node.op == "call_function" and node.target in _SYM_ARITHMETIC:
            def swap(a: Any) -> Any:
                value = node_value(a) if isinstance(a, fx.Node) else None
                if isinstance(value, torch.SymInt) and self.reads_length(value.node.expr, keys):
                    return self.global_symint(a, keys)
                return a
            result = self.call(node.target, fx.node.map_arg(node.args, swap))  # into sym_sum's list
        else:
            raise Refusal(f"{self.where(node)}: a table is built from a local length that Ulysses cannot "
                          f"recompute at the global length")
        self.cache[key] = result
        return result

    def check_placeable(self, node: fx.Node) -> None:
        """A dim holding sharded tokens next to tokens the analysis could not place (a length-1
        stream Dynamo specialised, say) cannot be sharded correctly: refuse rather than guess."""
        value = self.tokens.flow.values.get(node)
        for dims in value if isinstance(value, list) else [value]:
            if not isinstance(dims, tuple):
                continue
            for seq in dims:
                if seq is None:
                    continue
                segments = [self.segment_of_atom.get(a) for a in self.atoms.normalize(seq)]
                sharded = [s for s in segments if s is not None and self.stream_of_segment.get(s) in self.sharded]
                if sharded and any(s is None for s in segments):
                    raise Refusal(
                        f"{node.name} ({_op_name(node)}) holds sharded tokens next to tokens the token-dim "
                        f"analysis could not place (a length-1 stream?)"
                    )

    def feeds_only_masks(self, fill: fx.Node) -> bool:
        """Whether a fill's values reach nothing but attention masks without meeting a tensor that
        holds sharded tokens (`cat([text_mask, ones(B, s_img)])`): built at the global length, such a
        mask is whole on every rank and needs no gather at each site (local, it would be gathered)."""
        seen = {fill}
        stack = [fill]
        while stack:
            node = stack.pop()
            for user in node.users:
                if is_sdpa(user):
                    if sdpa_args(user)["attn_mask"] is not node:
                        return False
                    continue
                if user.op not in ("call_function", "call_method"):
                    return False
                if any(i not in seen and self.streams_of(i) & self.sharded for i in user.all_input_nodes):
                    return False
                if user not in seen:
                    seen.add(user)
                    if len(seen) > 32:  # a mask is a few ops; a longer path is treated as reaching tokens
                        return False
                    stack.append(user)
        return True

    def _sized_by_local_length(self, node: fx.Node, stream: int) -> bool:
        keys = self.length_keys({stream})
        value = node_value(node)
        sizes = value.shape if isinstance(value, torch.Tensor) else ()
        return any(isinstance(s, torch.SymInt) and self.reads_length(s.node.expr, keys) for s in sizes)

    def localize(self, node: fx.Node, streams: frozenset[int], *, before: fx.Node) -> fx.Node:
        """Slice the sharded `streams` of a full tensor to this rank's chunk, on every token dim."""
        result = node
        value = node_value(node)
        with self.graph.inserting_before(before):
            for dim, _ in self.tokens.token_dims_of(node):
                runs = self.runs(node, dim, self.local.get(node, frozenset()))
                pieces = [(r, bool(set(r.streams) & streams)) for r in runs]
                if not any(sharded for _, sharded in pieces):
                    continue
                grids = {st for r, sharded in pieces if sharded for st in r.streams} & set(self.grid_rows)
                if grids:  # a table the size of a patch grid (PixArt's pos_embed): this rank's whole rows
                    result = self.localize_runs(result, dim, runs, streams)
                    value = node_value(result)
                    continue
                # a run already local (the grid's rows, cut where they were made, next to whole text) keeps
                # its local length; the others are whole until cut
                lengths = [self.run_length(r, gathered=False) for r in runs]
                local_lengths = [self.run_length(_Run(r.streams, sharded or r.local), gathered=False)
                                 for r, sharded in pieces]
                shape = list(value.shape)
                shape[dim] = sum(node_value(n) for n in local_lengths)
                with self.fake_mode:
                    fake = torch.empty(shape, dtype=value.dtype, device=value.device)
                flags = [sharded for _, sharded in pieces]
                # a whole run of one stream is chunked by that stream's shares (the graph's node)
                shares = [self.chunks.get(r.streams[0]) if sharded and len(r.streams) == 1 and not r.local else None
                          for r, sharded in pieces]
                result = self.call(C.localize, (result, dim, lengths, flags, self.world, self.rank, shares), val=fake)
                value = fake
                self.bump("localize")
        self.local[result] = self.local.get(node, frozenset()) | streams
        self.same_tokens(result, node)
        return result

    def localize_runs(self, t: fx.Node, dim: int, runs: list[_Run], streams: frozenset[int]) -> fx.Node:
        """Along `dim`, each whole run of `streams` cut to this rank's part: a patch grid's run to its
        whole rows, another stream's to its `tensor_split` chunk; local runs and other streams kept.
        (A mask of ones over the grid's tokens and the text, say.)"""
        pieces = []
        for run, piece in zip(runs, self.split_runs(t, dim, runs, gathered=False)):
            if run.local or not set(run.streams) & streams:
                pieces.append(piece)
                continue
            if len(run.streams) != 1:
                raise Refusal(f"{self.where(t)} holds whole tokens of several streams side by side on dim {dim}")
            stream = run.streams[0]
            if stream in self.grid_rows:
                rows, cols = self.grid_rows[stream]
                pieces.append(self.call(C.localize_rows,
                                        (piece, dim, rows, cols, self.world, self.rank, self.chunks[stream])))
            else:
                value = node_value(piece)
                shape = list(value.shape)
                shape[dim] = node_value(self.stream_len[stream])
                with self.fake_mode:
                    fake = torch.empty(shape, dtype=value.dtype, device=value.device)
                pieces.append(self.call(C.localize, (piece, dim, [self.global_len[stream]], [True], self.world,
                                                     self.rank, [self.chunks[stream]]), val=fake))
            self.bump("localize")
        return pieces[0] if len(pieces) == 1 else self.call(torch.cat, (pieces, dim))

    def same_tokens(self, new: fx.Node, old: fx.Node) -> None:
        """An inserted node whose dims hold the tokens `old`'s hold (a cut to local rows): the
        analysis' answer for `old` is its answer for `new`."""
        if new is not old and old in self.tokens.flow.values:
            self.tokens.flow.values[new] = self.tokens.flow.values[old]
        if new is not old and old in self.tokens.by_node:
            self.tokens.by_node[new] = self.tokens.by_node[old]

    # -- attention -----------------------------------------------------------------------------
    def rewrite_attention(self, node: fx.Node) -> None:
        self.stack = node.meta.get("nn_module_stack")
        try:
            self._rewrite_attention(node)
        finally:
            self.stack = None

    def _rewrite_attention(self, node: fx.Node) -> None:
        args = sdpa_args(node)
        q, k, v, mask = args["query"], args["key"], args["value"], args["attn_mask"]
        for t in (q, k, v):
            self.propagate_input_only(t, node)
        q, k, v = sdpa_args(node)["query"], sdpa_args(node)["key"], sdpa_args(node)["value"]
        local = self.local.get(q, frozenset()) | self.local.get(k, frozenset()) | self.local.get(v, frozenset())
        if not local:
            self.local[node] = frozenset()
            return  # attention over replicated tokens only: every rank computes it, no exchange
        ndim = node_value(q).dim()
        seq_dim, head_dim = ndim - 2, ndim - 3
        if not self.runs(q, seq_dim, self.local.get(q, frozenset())):
            # the queries are tokens of no stream (Mochi's attention pool: one pooled query over the
            # caption): each attends to every key, so the keys, values and mask need all their tokens
            self.gather_or_refuse(node, [(t, self.local[t], f"{self.where(node)} attends from a query of no "
                                          f"token stream to sharded keys") for t in dict.fromkeys((k, v, mask))
                                         if isinstance(t, fx.Node) and self.local.get(t)])
            self.local[node] = frozenset()
            return
        if not any(self.holds_local_tokens(t, seq_dim) for t in (q, k, v)):
            # local tokens only along the batch dims (Krea2 attends across text-encoder layers token by token,
            # its text tokens merged into the batch): each rank attends its own tokens, nothing to exchange
            if isinstance(mask, fx.Node) and (self.streams_of(mask) & self.sharded) - self.local.get(mask, frozenset()):
                raise StreamRefusal(f"{self.where(node)} attends per local token with a mask holding whole tokens",
                                    (self.streams_of(mask) & self.sharded) - self.local.get(mask, frozenset()))
            self.local[node] = local
            return
        num_heads = node_value(q).shape[head_dim]
        if node_value(k).shape[head_dim] != num_heads or node_value(v).shape[head_dim] != num_heads:
            raise Refusal(f"{node.name}: q, k and v have different head counts")
        padded = C.padded_heads(int(num_heads), self.world)
        q_runs = self.runs(q, seq_dim, self.local.get(q, frozenset()))
        with self.graph.inserting_before(node):
            qh = self.to_heads(q, q_runs, seq_dim, head_dim, padded)
            kh = self.to_heads(k, self.runs(k, seq_dim, self.local.get(k, frozenset())), seq_dim, head_dim, padded)
            vh = self.to_heads(v, self.runs(v, seq_dim, self.local.get(v, frozenset())), seq_dim, head_dim, padded)
            new_mask = mask
            if isinstance(mask, fx.Node):
                new_mask = self.mask_heads(self.gather_mask(mask, ndim), ndim, head_dim, int(num_heads), padded)
            kwargs = {**{k_: v_ for k_, v_ in args.items() if k_ not in ("query", "key", "value", "attn_mask")},
                      "attn_mask": new_mask}
            attention = self.call(node.target, (qh, kh, vh), kwargs)
            attention.meta.update({k_: v_ for k_, v_ in node.meta.items() if k_ not in ("val", "example_value")})
            out = self.from_heads(attention, q_runs, seq_dim, head_dim, int(num_heads), node_value(node))
        node.replace_all_uses_with(out)
        self.dead.append(node)  # erased once the whole walk succeeds: `undo` needs it back otherwise
        self.local[out] = self.local.get(q, frozenset())
        self.bump("attention_sites")

    def propagate_input_only(self, t: fx.Node, user: fx.Node) -> None:
        """Make q/k/v consistent: a full piece of a sharded stream is sliced to this rank's chunk."""
        sharded_here = self.streams_of(t) & self.sharded
        need = sharded_here - self.local.get(t, frozenset())
        if need:
            user.replace_input_with(t, self.localize(t, frozenset(need), before=user))

    def to_heads(self, t: fx.Node, runs: list[_Run], seq_dim: int, head_dim: int, padded: int) -> fx.Node:
        """Sequence-sharded -> head-sharded: all-to-all for local runs, a local head slice for full ones."""
        padded_t = self.call(C.pad_heads, (t, head_dim, padded))
        parts = []
        for run, piece in zip(runs, self.split_runs(padded_t, seq_dim, runs, gathered=False)):
            if run.local:
                lengths = self.lengths_of(run.streams)
                start = self.call(C.seq_to_heads_start, (piece, seq_dim, head_dim, lengths, self.world, self.ctx.group_name))
                parts.append(self.call(C.seq_to_heads_wait, (start, seq_dim, head_dim)))
                self.bump("all_to_all")
            else:
                parts.append(self.call(C.local_heads, (piece, head_dim, self.world, self.rank)))
        return parts[0] if len(parts) == 1 else self.call(torch.cat, (parts, seq_dim))

    def gather_mask(self, mask: fx.Node, ndim: int) -> fx.Node:
        """The mask's key (and query) axis must cover the gathered sequence: all-gather local runs."""
        value = node_value(mask)
        result = mask
        for dim in (value.dim() - 1, value.dim() - 2):
            if dim < 0 or value.shape[dim] == 1:
                continue
            runs = self.runs(mask, dim, self.local.get(mask, frozenset()))
            if not any(r.local for r in runs):
                continue
            parts = []
            for run, piece in zip(runs, self.split_runs(result, dim, runs, gathered=False)):
                if run.local:
                    lengths = self.lengths_of(run.streams)
                    start = self.call(C.gather_seq_start, (piece, dim, lengths, self.world, self.ctx.group_name))
                    parts.append(self.call(C.gather_seq_wait, (start, dim, value.dtype)))
                    self.bump("all_gather")
                else:
                    parts.append(piece)
            result = parts[0] if len(parts) == 1 else self.call(torch.cat, (parts, dim))
        return result

    def mask_heads(self, mask: fx.Node, ndim: int, head_dim: int, num_heads: int, padded: int) -> fx.Node:
        """A mask with a dim per head (`prepare_attention_mask` repeats it per head) is cut to this
        rank's heads, as q, k and v are; a mask broadcast over the heads (size 1) is left alone."""
        value = node_value(mask)
        dim = head_dim - (ndim - value.dim())
        if dim < 0 or value.shape[dim] == 1:
            return mask
        size = value.shape[dim]
        expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))
        if not exprs_equal(expr, sympy.Integer(num_heads), self.fake_mode.shape_env):
            raise Refusal(f"the mask of an attention call has {value.shape[dim]} entries along the heads, "
                          f"not 1 or the {num_heads} heads")
        padded_mask = self.call(C.pad_heads, (mask, dim, padded))
        self.bump("mask_heads")
        return self.call(C.local_heads, (padded_mask, dim, self.world, self.rank))

    def from_heads(self, attention: fx.Node, runs: list[_Run], seq_dim: int, head_dim: int, num_heads: int, original: Any) -> fx.Node:
        """Head-sharded -> the layout the graph had: all-to-all back for local runs, all-gather of
        heads for full ones; padded heads stripped."""
        parts = []
        for run, piece in zip(runs, self.split_runs(attention, seq_dim, runs, gathered=True)):
            if run.local:
                lengths = self.lengths_of(run.streams)
                start = self.call(C.heads_to_seq_start, (piece, seq_dim, head_dim, lengths, self.world, self.rank, self.ctx.group_name))
                back = self.call(C.heads_to_seq_wait, (start, seq_dim, head_dim, self.world))
                self.bump("all_to_all")
            else:
                start = self.call(C.gather_heads_start, (piece, head_dim, self.world, self.ctx.group_name))
                back = self.call(C.gather_heads_wait, (start, head_dim))
                self.bump("all_gather")
            parts.append(self.call(C.strip_heads, (back, head_dim, num_heads)))
        if len(parts) == 1:
            parts[0].meta["val"] = original
            return parts[0]
        return self.call(torch.cat, (parts, seq_dim), val=original)

    # -- outputs -------------------------------------------------------------------------------
    def plan_outputs(self, output: fx.Node) -> None:
        flat, _ = tree_flatten(output.args[0])
        gathered: dict[fx.Node, fx.Node] = {}
        for index, out in enumerate(flat):
            if not isinstance(out, fx.Node) or not self.local.get(out):
                continue
            grids = set(self.local[out]) & set(self.grid_rows)
            if grids:
                # patch-grid tokens returned as tokens: the executor knows no global length for them
                # (no input carries them), so they are gathered here, in the graph
                if out not in gathered:
                    gathered[out] = self.gather_tokens(out, grids, before=output)
                    output.replace_input_with(out, gathered[out])
            local = self.local[gathered[out]] if grids else self.local[out]
            if not local:
                continue
            dims = [(dim, self.runs(out, dim, local)) for dim, _ in self.tokens.token_dims_of(out)]
            if any(any(r.local for r in runs) and not all(r.local for r in runs) for _, runs in dims):
                # local tokens next to whole ones (a stream kept replicated) on one dim: the executor
                # gathers whole dims only, so the local runs are gathered here, in the graph
                source = gathered.get(out, out)
                gathered[out] = self.gather_tokens(source, set(local), before=output)
                output.replace_input_with(source, gathered[out])
                continue
            for dim, runs in dims:  # the dims the analysis saw (before any gather)
                if grids and not any(r.local for r in runs):
                    continue  # the gathered grid dim
                streams = tuple(s for r in runs for s in r.streams)
                self.plan.outputs.append(OutputGather(index, dim, streams))


def _shares(symbols: Any, name: str, length: Any, world: int, rank: int, unit: Any = 1) -> list[Any]:
    """Every rank's share of a sharded length (`chunk_lengths`'s, times `unit`: a patch grid's rows
    times its columns), for this rank's shapes: this rank's share is a fresh symbol (hint: its
    value at the example) and so is every other's but one, which is the length less the others'
    (so the shares add up to the length itself: a gathered stream is `length` long). No floor
    division by the world size is left in them. A static length's shares are numbers."""
    from npu_dit.passes.analysis.fake_prop import shape_hint

    if not isinstance(length, torch.SymInt):
        return [n * unit for n in C.chunk_lengths(int(length), world)]
    hints = C.chunk_lengths(shape_hint(symbols.env, length.node.expr), world)
    rest = (rank + 1) % world  # the share given as the remainder: never this rank's
    shares = [None if j == rest else
              symbols.env.create_symintnode(symbols.new_symbol(f"{name}_{j}", hint), hint=hint) * unit
              for j, hint in enumerate(hints)]
    shares[rest] = length * unit - sum(s for s in shares if s is not None)
    return shares


def refresh_local_shapes(gm: fx.GraphModule, plan: ShardingPlan, rewriter: "_Rewriter | None" = None) -> None:
    """Every node's meta["val"] becomes the value this rank computes: the global-length inputs get a
    global symbol G per stream, each rank's share of it a fresh symbol of its own (the chunk-lengths
    node's value, KEPT: every later propagation takes it as given), sharded token dims and the SymInt
    inputs the executor refreshes this rank's share; no shape holds a floor division by the world
    size. A patch grid's shares are fresh row counts times its columns."""
    from npu_dit.passes.analysis.fake_prop import (KEPT, Rewired, SymbolMap, copied_placeholder_values, refresh,
                                                   repropagate, shape_hint, stand_in_for_keys, swapped_inputs)

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    symbols = SymbolMap(specialize_zero_one=False)
    local: dict[int, Any] = {}  # stream id -> local length (SymInt)
    global_: dict[int, Any] = {}  # stream id -> global length (SymInt)
    given: dict[fx.Node, Any] = {}  # chunk-lengths node -> every rank's share (fresh symbols)
    env = graph_fake_mode(gm).shape_env  # Dynamo's: the one the plan's lengths are written in
    for stream in plan.sharded_streams:
        length = max(stream.example_length or 2, 2)  # a hint of 0/1 would be specialised
        proven = sorted(stream.lengths, key=str)
        if proven:
            # a length the graph also computes from other inputs (the RoPE table's `s47*s8 + s56*s86`):
            # the global length IS that expression, in the new symbols, so the table built from those
            # inputs, its slices and the sharded tokens agree in the new ShapeEnv as they do at run time
            global_[stream.id] = symbols.expression(proven[0], env)
        else:
            symbol = symbols.new_symbol(f"global_len_{stream.id}", length)
            global_[stream.id] = symbols.env.create_symintnode(symbol, hint=length)
        chunks = _shares(symbols, f"local_len_{stream.id}", global_[stream.id], plan.world_size, plan.rank)
        local[stream.id] = chunks[plan.rank]
        if rewriter is not None and stream.id in rewriter.chunks:
            node = rewriter.chunks[stream.id]
            if stream.id in rewriter.grid_rows:  # rank j: rows_j whole rows of `cols` tokens
                rows, cols = (symbols.size(node_value(n)) for n in rewriter.grid_rows[stream.id])
                chunks = _shares(symbols, f"local_rows_{stream.id}", rows, plan.world_size, plan.rank, cols)
            given[node] = chunks
            node.meta[KEPT] = True
        for old in stream.symbols:
            symbols.bind(old, size_expr(local[stream.id]))
        
    shard_dims = {(ph, dim): stream for ph, dim, stream in plan.shard_inputs}
    local_symints = {i: (ph, dim) for i, ph, dim in plan.local_symints}
    first_global = len(placeholders) - len(plan.global_lengths)

    def override(i: int, node: fx.Node) -> Any:
        if i >= first_global:
            return global_[plan.global_lengths[i - first_global]]
        if i in local_symints:
            return local[shard_dims[local_symints[i]]]
        value = node_value(node)
        if isinstance(value, torch.Tensor) and any((i, d) in shard_dims for d in range(value.dim())):
            sizes = [local[shard_dims[(i, d)]] if (i, d) in shard_dims else symbols.size(s)
                     for d, s in enumerate(value.shape)]
            return symbols.tensor(value, sizes)
        if isinstance(value, torch.Tensor) and any(
                isinstance(s, torch.SymInt) and s.node.expr.free_symbols & whole.keys() for s in value.shape):
            return symbols.tensor(value, [whole_size(s) for s in value.shape])  # an input kept whole: global
        return None

    whole = {old: global_[s.id].node.expr for s in plan.sharded_streams for old in s.symbols}

    def whole_size(size: Any) -> Any:
        new = symbols.size(size)  # maps every other symbol of `size`
        if not isinstance(size, torch.SymInt) or not size.node.expr.free_symbols & set(whole):
            return new
        expr = size.node.expr.xreplace({**symbols.symbols, **whole})  # at once: new and old names may clash
        if not expr.free_symbols:
            return int(expr)
        return symbols.env.create_symintnode(expr, hint=shape_hint(symbols.env, expr))

    # the values the graph's own nodes had before this pass (a re-wired node's old inputs)
    old_values = {} if rewriter is None else {n: n.meta.get("val") for n in rewriter.original_args}
    values = copied_placeholder_values(gm, symbols, override)
    if rewriter is None or os.environ.get("NPU_DIT_FULL_REFRESH") == "1":
        for node, chunks in given.items():
            node.meta["val"] = chunks
        repropagate(gm, values)
        return
    # an untouched node: the stream symbols become this rank's local length where the node holds the
    # stream's tokens locally, the global length where it holds them whole (a table built at full size)
    lengths = {s.id: (size_expr(local[s.id]), size_expr(global_[s.id])) for s in plan.sharded_streams}
    mappings: dict[frozenset, dict] = {}
    # a patch grid's token count is an expression of its input's dims (`(s1//2)*(s2//2)`, no symbol of
    # its own): in a node holding the grid's tokens locally, that product becomes this rank's count
    # (the pass's own length node, refreshed before any node that uses it); a static grid is run
    grids = {g: node_value(rewriter.global_len[g]) for g in rewriter.grid_rows}
    grids = {g: (v.node.expr, v.node.expr.free_symbols) for g, v in grids.items() if isinstance(v, torch.SymInt)}
    clean: dict[tuple, bool] = {}

    def only_whole_counts(node: fx.Node, held_grids: set[int]) -> bool:
        """Whether every size and stride of the node's old value reads the grids' input dims only
        through the grids' whole token counts (a dim of rows alone, say, is not substituted: run)."""
        keys = [grids[g][0] for g in held_grids]
        dims = set().union(*(grids[g][1] for g in held_grids))
        exprs = []
        for value in tree_flatten(node.meta.get("val"))[0]:
            if isinstance(value, torch.Tensor):
                exprs += [s.node.expr for s in (*value.shape, *value.stride()) if isinstance(s, torch.SymInt)]
            elif isinstance(value, torch.SymInt):
                exprs.append(value.node.expr)
        for expr in exprs:
            key = (expr, tuple(keys))
            if key not in clean:
                clean[key] = not (stand_in_for_keys(expr, keys)[0].free_symbols & dims)
            if not clean[key]:
                return False
        return True

    def rename(node: fx.Node) -> dict | Rewired | None:
        original = rewriter.original_args.get(node)
        if original is None:
            return None  # inserted: run it (or its shape rule)
        held = rewriter.local.get(node, frozenset())
        held_grids = held & set(rewriter.grid_rows)
        if held_grids and not (held_grids <= grids.keys() and only_whole_counts(node, held_grids)):
            return None  # local patch-grid tokens in another form: run it
        mapping = mappings.get(held)
        if mapping is None:
            # a stream's symbol, and each expression proven equal to it (`Stream.lengths`), whole
            mapping = {old: lengths[s.id][0 if s.id in held else 1]
                       for s in plan.sharded_streams for old in s.symbols | s.lengths}
            for g in held_grids:
                count = node_value(rewriter.stream_len[g])  # refreshed: this rank's count, new symbols
                mapping[grids[g][0]] = count.node.expr if isinstance(count, torch.SymInt) else sympy.Integer(count)
            mappings[held] = mapping
        if original[0] is node.args and original[1] is node.kwargs:
            return mapping
        # re-wired (the permute after a rewritten attention): substituted where each new input has the
        # value the old one had with this node's lengths put in, run otherwise
        swapped = swapped_inputs(original, (node.args, node.kwargs))
        if swapped is None or any(old not in old_values for _, old in swapped):
            return None
        return Rewired(mapping, [(new, old_values[old]) for new, old in swapped])

    from npu_dit.passes.collective_meta import RULES

    refresh(gm, values, symbols, rename, RULES, given=given)


class StreamRefusal(Refusal):
    """A refusal caused by the tokens of some sharded streams (`streams`, ids in the plan): with those
    streams replicated the rewrite may still be exact for the others."""

    def __init__(self, reason: str, streams: frozenset[int], *, fix: str | None = None) -> None:
        super().__init__(reason, fix=fix)
        self.streams = frozenset(s for s in streams if s is not None)


def ulysses_pass(gm: fx.GraphModule, *, ctx: ParallelContext) -> PassResult:
    """Shard every stream the rules allow. A refusal that names streams (a pooled mean over the text,
    say) is retried with those streams replicated, while another stream is left to shard: the first
    attempt is undone (its nodes erased, every original node's arguments restored), so the retry sees
    the graph as it was, and the analyses of it stay valid."""
    tokens = token_dims(gm)
    replicated: dict[tuple[int, ...], str] = {}
    while True:
        plan = plan_streams(gm, tokens, world_size=ctx.world_size, rank=ctx.rank, replicated=replicated)
        sharded = {s.id: s for s in plan.streams if s.sharded}
        rewriter = _Rewriter(gm, tokens, plan, ctx)
        try:
            rewriter.run()
            break
        except StreamRefusal as refusal:
            if not rewriter.replicable(refusal.streams):
                raise  # nothing left to shard, or a patch grid (its tokens belong to no input to keep whole)
            rewriter.undo()
            for stream in refusal.streams:
                replicated[sharded[stream].segments] = f"kept whole: with it sharded, {refusal.reason}"
    gm.meta[SHARDING_META_KEY] = plan
    gm.graph.lint()
    gm.recompile()
    refresh_local_shapes(gm, plan, rewriter)
    return PassResult(gm, modified=True, counts=rewriter.counts, notes=plan.describe())
