"""Which token streams Ulysses shards, and what the executor does at the graph's boundary.

A *stream* is what one input token dim carries (FLUX: text, image; Qwen-Image-Edit: text, and the
image stream made of the target latents plus each input image). A stream is sharded (every rank
holds chunk `rank` of `tensor_split(stream, world)`) when its length is symbolic in the graph. It
stays replicated when its length is a constant (Qwen-Image's text with a mask: Dynamo specialises
it). Tables the graph builds from a stream's length (RoPE slices) are rebuilt at the global length by
the rewriter and sliced to each rank's rows. Nothing here names a model.

The plan records, for the executor: inputs to shard, SymInt inputs to recompute from the local
shapes, the global stream lengths the rewritten graph takes as extra inputs, and outputs to gather.
"""

from __future__ import annotations

import collections
import dataclasses

import sympy
import torch
import torch.fx as fx

from npu_dit.passes.analysis.attention_ops import graph_fake_mode, node_value
from npu_dit.passes.analysis.symbolic import size_expr
from npu_dit.passes.analysis.token_dims import TokenDims, require_dynamic_token_dims
from npu_dit.passes.infra import Refusal
from npu_dit.plans import OutputGather, ShardingPlan, Stream  # noqa: F401 - the plan types live in a neutral module

def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _static_table_of_a_grid(tdim, tokens: TokenDims) -> bool:
    """An input of constant length along tokens that are also patchified inside the graph: a positional
    table the size of the grid (PixArt's `pos_embed` buffer at the model's own sample size, where Dynamo
    specialises the latent's height and width to constants). Its constant length is no reason to
    replicate the tokens: the patch grid is cut in whole rows where the tokens are made, and the table is
    a replicated tensor sliced to this rank's rows where it meets them."""
    size = node_value(tdim.node).shape[tdim.dim]
    return not isinstance(size, torch.SymInt) and all(seg in tokens.grids for seg in tdim.segments)


def _table_of_streams(tdim, tokens: TokenDims) -> bool:
    """An input whose token dim lays several segments side by side, each of which another input carries
    alone (Krea2's `position_ids` rows for text ++ image, beside `encoder_hidden_states` and
    `hidden_states`): a table, not a stream of its own. It enters whole and is cut to this rank's run of
    each sharded stream where it meets local tokens (Replicate -> Shard, as for a table built in the graph)."""
    return len(tdim.segments) > 1 and all(
        any(other.segments == (seg,) for other in tokens.inputs if other is not tdim) for seg in tdim.segments)


def _length_expression(expr: sympy.Expr, stream: Stream) -> bool:
    """Whether a stream can take `expr` as its length: a product of symbols or a sum of such products
    with positive whole coefficients and no constant (a grid's `F*H*W`, two grids' `h1*w1 + h2*w2`: what
    the local shapes put in whole, `fake_prop.put_in`), the only length the stream's inputs have. A
    difference or a constant term (Lumina2's padding, `80 - s29`) is no count of tokens of its own."""
    if stream.symbols or any(other != expr for other in stream.lengths):
        return False
    if not isinstance(expr, (sympy.Add, sympy.Mul, sympy.Pow)):
        return False
    for term in sympy.Add.make_args(sympy.expand(expr)):
        coefficient, rest = term.as_coeff_Mul()
        if not (coefficient.is_Integer and coefficient > 0) or not rest.free_symbols:
            return False
        if not all(isinstance(base, sympy.Symbol) and exponent.is_Integer and exponent > 0
                   for base, exponent in rest.as_powers_dict().items()):
            return False
    return True


def _find_lengths(gm: fx.GraphModule, streams: list[Stream]) -> None:
    """Each stream's `lengths`: the expressions Dynamo's ShapeEnv holds equal to its symbol by a guard
    (`Eq(s50, s47*s8 + s56*s86)`: the RoPE table the graph builds from the grid sizes meets the image
    tokens in a broadcast). Only a whole expression of other symbols counts: one symbol standing for
    another is no proof that it always means the stream's length, and a stream's own symbol inside it
    would make it the stream's length plus something else."""
    owner = {symbol: stream for stream in streams for symbol in stream.symbols}
    mode = graph_fake_mode(gm) if owner else None
    env = getattr(mode, "shape_env", None)
    if env is None:
        return
    found: dict[int, set] = {}
    for guard in env.guards:
        expr = guard.expr
        if not isinstance(expr, sympy.Eq):
            continue
        mentioned = [x for x in expr.free_symbols if x in owner]
        if len(mentioned) != 1:
            continue
        symbol = mentioned[0]
        difference = sympy.expand(expr.lhs - expr.rhs)
        coefficient = difference.coeff(symbol)
        rest = difference - coefficient * symbol
        if coefficient not in (1, -1) or symbol in rest.free_symbols:
            continue
        length = sympy.expand(-rest * coefficient)  # s = -rest / c, c = +-1
        if isinstance(length, sympy.Symbol) or not length.free_symbols or not length.is_integer:
            continue
        found.setdefault(owner[symbol].id, set()).add(length)
    for stream in streams:
        stream.lengths = stream.lengths | frozenset(found.get(stream.id, ()))


def plan_streams(gm: fx.GraphModule, tokens: TokenDims, *, world_size: int, rank: int,
                 replicated: dict[tuple[int, ...], str] | None = None) -> ShardingPlan:
    """`replicated`: streams (by their segments) to keep whole, with the reason (a first attempt
    refused because of them)."""
    replicated = replicated or {}
    require_dynamic_token_dims(tokens, f"Ulysses sequence parallelism (ulysses_degree={world_size})")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index_of = {n: i for i, n in enumerate(placeholders)}

    streams: list[Stream] = []
    by_segments: dict[tuple[int, ...], Stream] = {}
    owner: dict[int, int] = {}  # segment -> stream id
    for tdim in tokens.inputs:
        if _static_table_of_a_grid(tdim, tokens) or _table_of_streams(tdim, tokens):
            continue  # the grid below shards these tokens; this input is a table sliced where it meets them
        stream = by_segments.get(tdim.segments)
        if stream is None:
            for seg in tdim.segments:
                if seg in owner:
                    raise Refusal(
                        f"token segment {seg} is carried by inputs with different layouts "
                        f"({tdim.name} dim {tdim.dim}); Ulysses cannot pick one sharding for it"
                    )
            stream = Stream(len(streams), tdim.segments, [], True, "dynamic length", frozenset(), None)
            streams.append(stream)
            by_segments[tdim.segments] = stream
            for seg in tdim.segments:
                owner[seg] = stream.id
        stream.inputs.append((index_of[tdim.node], tdim.dim))
        stream.name = ", ".join(filter(None, [stream.name, f"{tdim.name}[{tdim.dim}]"]))
        size = node_value(tdim.node).shape[tdim.dim]
        expr = size_expr(size)
        stream.example_length = size.node.hint if isinstance(size, torch.SymInt) else int(size)
        if not isinstance(expr, sympy.Symbol) and _length_expression(expr, stream):
            # a length Dynamo writes through other inputs (LTX-Video's `F*H*W` tokens): the expression is
            # the stream's length, global in tables built from those inputs and local in its tokens
            stream.lengths = stream.lengths | {expr}
        elif not isinstance(expr, sympy.Symbol):
            stream.sharded = False
            if expr.free_symbols:
                stream.reason = f"its length {expr} is neither a plain symbol nor a sum of products of symbols"
            elif stream.example_length == 1:
                stream.reason = "a single token (Dynamo specialises length 1)"
            else:
                stream.reason = "Dynamo specialised its length to a constant"
        else:
            stream.symbols = stream.symbols | {expr}
        if tdim.segments in replicated:
            stream.sharded, stream.reason = False, replicated[tdim.segments]
    for segment in tokens.segments:
        grid = tokens.grids.get(segment.id)
        if segment.id in owner or grid is None or (segment.id,) in replicated:
            continue  # (a replicated patch grid: tokens of no stream, whole on every rank)
        # tokens patchified from an input (no input carries them): every rank keeps a contiguous run of
        # whole patch rows, cut where the tokens are made; the input itself stays whole
        stream = Stream(len(streams), (segment.id,), [], True, "patch rows", frozenset(), segment.hint,
                        name=grid.describe(), grid=(index_of[grid.input], grid.row_dim, grid.col_dim, *grid.patch)
                        + ((grid.lead,) if grid.lead else ()))
        streams.append(stream)
        owner[segment.id] = stream.id
    for stream in streams:
        # an expression length must be of inputs that are no other stream's (`s1 + s2` of the text's and
        # the image's lengths is both streams side by side, not a stream of its own)
        others = frozenset().union(*(o.symbols for o in streams if o is not stream),
                                   *(e.free_symbols for o in streams if o is not stream for e in o.lengths))
        if stream.sharded and not stream.symbols and any(e.free_symbols & others for e in stream.lengths):
            stream.sharded = False
            stream.reason = f"its length {min(stream.lengths, key=str)} is written with another stream's length"
    _find_lengths(gm, [s for s in streams if s.sharded and s.grid is None])
    if streams and not any(s.symbols or s.lengths for s in streams):
        for stream in streams:  # nothing symbolic at all: the graph was traced with static shapes
            stream.fix = "Compile with torch.compile(..., dynamic=True) so the sequence lengths stay symbolic."

    # an input holding sharded tokens on two dims (a mask [B, 1, N, N]) enters whole: a rank's chunk of
    # both dims cannot be made whole again (the pairs of one rank's queries with another's keys are
    # on neither), and attention needs it whole; it is cut where it meets local tokens
    pairs = [(ph, dim, s.id) for s in streams if s.sharded and s.grid is None for ph, dim in s.inputs]
    token_dims_per_input = collections.Counter(ph for ph, _, _ in pairs)
    shard_inputs = [p for p in pairs if token_dims_per_input[p[0]] == 1]
    for stream in streams:
        if stream.sharded and stream.grid is None and not any(s == stream.id for _, _, s in shard_inputs):
            stream.sharded, stream.reason = False, "carried only by inputs that hold it on two dims (a mask)"
    if not any(s.sharded for s in streams):
        reasons = "; ".join([f"stream {s.id} ({s.name}): {s.reason}" for s in streams] + [
            f"tokens made inside the graph at {seg.origin}, not a patch grid of an input (a convolution "
            f"with kernel == stride and no padding, or a row-major reshape/permute patchify)"
            for seg in tokens.segments if seg.id not in owner])
        fix = "Compile with torch.compile(..., dynamic=True)." if any(s.fix for s in streams) else None
        raise Refusal(f"Ulysses found no token stream it can shard ({reasons})", fix=fix)

    local_symbols: dict[sympy.Symbol, tuple[int, int]] = {}
    for ph, dim, _ in shard_inputs:
        local_symbols.setdefault(node_value(placeholders[ph]).shape[dim].node.expr, (ph, dim))
    local_symints = []
    for i, node in enumerate(placeholders):
        value = node_value(node)
        if isinstance(value, torch.SymInt) and value.node.expr in local_symbols:
            ph, dim = local_symbols[value.node.expr]
            local_symints.append((i, ph, dim))
    return ShardingPlan(world_size, rank, streams, shard_inputs, local_symints)
