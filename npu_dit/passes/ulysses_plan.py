"""Which token streams Ulysses shards, and what the executor does at the graph's boundary.

A *stream* is what one input token dim carries (FLUX: text, image; Qwen-Image-Edit: text, and the
image stream made of the target latents plus each input image). A stream is sharded (every rank
holds chunk `rank` of `tensor_split(stream, world)`) when its length is symbolic in the graph. It
stays replicated when its length is a constant (Qwen-Image's text with a mask: Dynamo specialises
it), or when the graph builds a position-dependent table from its length (such a table would come
out as the first L/P rows instead of this rank's rows). Nothing here names a model.

The plan records, for the executor: inputs to shard, SymInt inputs to recompute from the local
shapes, the global stream lengths the rewritten graph takes as extra inputs, and outputs to gather.
"""

from __future__ import annotations

import dataclasses

import sympy
import torch
import torch.fx as fx

from npu_dit.passes.analysis.attention_ops import node_value
from npu_dit.passes.analysis.token_dims import TokenDims, require_dynamic_token_dims
from npu_dit.passes.infra import UserError

# ops whose output does not depend on positions along the dims they create
CONSTANT_FILLS = {
    "ones", "zeros", "full", "empty", "ones_like", "zeros_like", "full_like", "empty_like",
    "new_ones", "new_zeros", "new_full", "new_empty",
}


@dataclasses.dataclass
class Stream:
    id: int
    segments: tuple[int, ...]
    inputs: list[tuple[int, int]]  # (placeholder index, dim) of the input token dims carrying it
    sharded: bool
    reason: str  # why it is replicated, or "dynamic length"
    symbols: frozenset  # sympy symbols of its length, local on every rank once sharded
    example_length: int | None


@dataclasses.dataclass
class OutputGather:
    index: int  # position in the graph's output tuple
    dim: int
    streams: tuple[int, ...]  # stream ids along `dim`, in order


@dataclasses.dataclass
class ShardingPlan:
    world_size: int
    rank: int
    streams: list[Stream]
    shard_inputs: list[tuple[int, int, int]]  # (placeholder index, dim, stream id)
    local_symints: list[tuple[int, int, int]]  # (SymInt placeholder index, tensor placeholder index, dim)
    global_lengths: list[int] = dataclasses.field(default_factory=list)  # stream ids of the appended inputs
    outputs: list[OutputGather] = dataclasses.field(default_factory=list)

    @property
    def sharded_streams(self) -> list[Stream]:
        return [s for s in self.streams if s.sharded]

    def describe(self) -> list[str]:
        lines = []
        for s in self.streams:
            state = "sharded" if s.sharded else f"replicated ({s.reason})"
            lines.append(f"stream {s.id} (segments {list(s.segments)}, e.g. {s.example_length} tokens): {state}")
        return lines


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def plan_streams(gm: fx.GraphModule, tokens: TokenDims, *, world_size: int, rank: int) -> ShardingPlan:
    require_dynamic_token_dims(tokens, f"Ulysses sequence parallelism (ulysses_degree={world_size})")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index_of = {n: i for i, n in enumerate(placeholders)}

    streams: list[Stream] = []
    by_segments: dict[tuple[int, ...], Stream] = {}
    owner: dict[int, int] = {}  # segment -> stream id
    for tdim in tokens.inputs:
        stream = by_segments.get(tdim.segments)
        if stream is None:
            for seg in tdim.segments:
                if seg in owner:
                    raise NotImplementedError(
                        f"token segment {seg} is carried by inputs with different layouts "
                        f"({tdim.name} dim {tdim.dim}); Ulysses cannot pick one sharding for it"
                    )
            stream = Stream(len(streams), tdim.segments, [], True, "dynamic length", frozenset(), None)
            streams.append(stream)
            by_segments[tdim.segments] = stream
            for seg in tdim.segments:
                owner[seg] = stream.id
        stream.inputs.append((index_of[tdim.node], tdim.dim))
        size = node_value(tdim.node).shape[tdim.dim]
        expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))
        stream.example_length = size.node.hint if isinstance(size, torch.SymInt) else int(size)
        if not isinstance(expr, sympy.Symbol):
            stream.sharded = False
            stream.reason = "static length" if not expr.free_symbols else f"length {expr} is not a plain symbol"
        else:
            stream.symbols = stream.symbols | {expr}

    for built in tokens.built:
        if _op_name(built.node) in CONSTANT_FILLS:
            continue
        for stream in streams:
            if stream.sharded and set(built.segments) & set(stream.segments) and built.size.free_symbols & stream.symbols:
                stream.sharded = False
                stream.reason = f"the graph builds the position table '{built.name}' from its length"

    if not any(s.sharded for s in streams):
        reasons = "; ".join(f"stream {s.id}: {s.reason}" for s in streams)
        raise UserError(
            f"Ulysses found no token stream it can shard ({reasons}). Compile with dynamic=True so the "
            f"sequence lengths stay symbolic."
        )

    shard_inputs = [(ph, dim, s.id) for s in streams if s.sharded for ph, dim in s.inputs]
    local_symbols: dict[sympy.Symbol, tuple[int, int]] = {}
    for stream in streams:
        if stream.sharded:
            for ph, dim in stream.inputs:
                local_symbols.setdefault(node_value(placeholders[ph]).shape[dim].node.expr, (ph, dim))
    local_symints = []
    for i, node in enumerate(placeholders):
        value = node_value(node)
        if isinstance(value, torch.SymInt) and value.node.expr in local_symbols:
            ph, dim = local_symbols[value.node.expr]
            local_symints.append((i, ph, dim))
    return ShardingPlan(world_size, rank, streams, shard_inputs, local_symints)
