"""Plan types the passes write and the runtime executes (neutral: imports neither side).

`CachePlan` is what the cache-regions pass cut: the front / middle / back region graphs and where
each region's inputs and the graph's outputs come from; the cache controller runs it.

`ShardingPlan` is what the Ulysses pass decided for one graph on one rank: which token streams are
sharded, which inputs to shard on which dim, which SymInt inputs become local lengths, which global
lengths the rewritten graph takes as extra inputs, and which outputs to gather. The executor applies
it around every call; `fingerprint()` is what the ranks compare before the first run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Callable

import torch.fx as fx
from torch.utils._pytree import tree_unflatten

SHARDING_META_KEY = "npu_dit.sharding"  # gm.meta key of the ShardingPlan


@dataclasses.dataclass
class Stream:
    id: int
    segments: tuple[int, ...]
    inputs: list[tuple[int, int]]  # (placeholder index, dim) of the input token dims carrying it
    sharded: bool
    reason: str  # why it is replicated, or "dynamic length"
    symbols: frozenset  # sympy symbols of its length, local on every rank once sharded
    example_length: int | None
    name: str = ""  # the inputs carrying it, e.g. "hidden_states[1], img_ids[0]"
    fix: str | None = None  # what the user can do to have it sharded, when replicated for a fixable reason
    # tokens made inside the graph from an input's patch grid (no input carries them):
    # (placeholder index, row dim, column dim, patch rows, patch columns); each rank holds a run of
    # whole patch rows, cut in the graph right where the tokens are made
    grid: tuple[int, int, int, int, int] | None = None
    # expressions of other inputs' symbols that Dynamo's ShapeEnv proves equal to its length (Qwen-Image-Edit's
    # RoPE table is `s47*s8 + s56*s86` long, the output grid's tokens and the input image's, where the
    # image stream is `s50`): the local shapes put its local or global length in for each of them, whole
    lengths: frozenset = frozenset()


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
        """Streams the executor shards at the inputs (a patch-grid stream is cut inside the graph)."""
        return [s for s in self.streams if s.sharded and s.grid is None]

    def length_input(self, stream: Stream) -> tuple[int, int]:
        """(placeholder index, dim) of an input that holds `stream`'s tokens as this graph sees them: one
        the executor cuts if the stream is sharded (a mask holding it on two dims enters whole)."""
        if stream.sharded:
            return next((ph, dim) for ph, dim, s in self.shard_inputs if s == stream.id)
        return stream.inputs[0]

    def fingerprint(self) -> str:
        """What must be equal on every rank for the rewritten graphs to exchange matching collectives."""
        streams = [(s.id, s.segments, s.inputs, s.sharded, s.grid) for s in self.streams]
        return repr((self.world_size, streams, self.shard_inputs, self.local_symints, self.global_lengths,
                     [(o.index, o.dim, o.streams) for o in self.outputs]))

    def describe(self) -> list[str]:
        lines = []
        for s in self.streams:
            state = "sharded" if s.sharded else f"replicated ({s.reason})"
            if s.grid is not None and s.sharded:
                state = f"sharded in whole patch rows of {s.name}"
            carried = s.name or f"segments {list(s.segments)}"
            lines.append(f"stream {s.id} ({carried}, e.g. {s.example_length} tokens): {state}")
        return lines


def stable_hash(text: str) -> int:
    """A 63-bit hash of `text`, equal on every rank and every run (unlike `hash()`)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


CACHE_PLAN_KEY = "npu_dit.cache_plan"

Source = tuple[str, int]  # ("arg", placeholder position) | ("front"|"middle"|"back", output position)


@dataclasses.dataclass
class Region:
    name: str
    gm: fx.GraphModule
    inputs: list[Source]
    blocks: list[str]  # block paths inside the region
    nodes: int


@dataclasses.dataclass
class CachePlan:
    front: Region
    middle: Region
    back: Region
    image_in: int  # front output position of h_0
    image_fn: int  # front output position of h_Fn
    residual_pairs: list[tuple[int, int, str]]  # (middle output position, middle input position, stream)
    outputs: list[Source]  # the graph's flat outputs
    output_spec: object  # pytree spec of the graph's output
    timestep_arg: int | None

    @property
    def regions(self) -> list[Region]:
        return [self.front, self.middle, self.back]


def rebuild_outputs(plan: CachePlan, values: dict[str, tuple]) -> object:
    flat = [values[kind][index] if kind != "const" else index for kind, index in plan.outputs]
    return tree_unflatten(flat, plan.output_spec)


def output_builder(plan: CachePlan) -> Callable[[dict[str, tuple]], object]:
    """`rebuild_outputs` for one plan, decided once: a graph's output is nearly always a flat tuple of
    tensors, which needs no pytree walk per call."""
    spec = plan.output_spec
    flat_tuple = spec.type is tuple and all(child.is_leaf() for child in spec.children())
    if not flat_tuple:
        return functools.partial(rebuild_outputs, plan)
    sources = list(plan.outputs)

    def build(values: dict[str, tuple]) -> object:
        return tuple([values[kind][index] if kind != "const" else index for kind, index in sources])

    return build


# --- tensor parallelism ---------------------------------------------------------------------------

TP_META_KEY = "npu_dit.tensor_parallel"  # gm.meta key of the TensorParallelPlan


def feature_blocks(segs: tuple[int, ...], world: int, rank: int) -> list[tuple[int, int]]:
    """(start, length) of rank `rank`'s block of every segment of a sharded feature dim: a dim of
    segments `segs` (sizes, in order) is split segment by segment into `world` equal blocks."""
    blocks, offset = [], 0
    for size in segs:
        block = size // world
        blocks.append((offset + rank * block, block))
        offset += size
    return blocks


@dataclasses.dataclass(frozen=True)
class WeightShard:
    index: int  # placeholder index of the parameter
    name: str  # e.g. "transformer_blocks.0.attn.to_q.weight"
    dim: int  # 0: output rows (column-sharded weight, its bias); 1: input columns (row-sharded weight)
    segs: tuple[int, ...]  # segments of that dim, each split in world equal blocks
    global_shape: tuple[int, ...]
    element_size: int


@dataclasses.dataclass
class TensorParallelPlan:
    """What the tensor-parallel pass decided for one graph on one rank: which parameters the
    executor feeds as shards (and may release), and each linear's placement with the reason."""

    world_size: int
    rank: int
    shards: list[WeightShard]
    placements: list[tuple[str, str, str]]  # (module, column|row|gather|replicated, reason)
    release_weights: bool = True
    parameter_bytes: int = 0  # all parameters the graph reads, unsharded
    local_parameter_bytes: int = 0  # what this rank holds

    def fingerprint(self) -> str:
        return repr((self.world_size, [(s.index, s.dim, s.segs, s.global_shape) for s in self.shards]))

    def describe(self) -> list[str]:
        counts: dict[str, int] = {}
        for _, kind, _ in self.placements:
            counts[kind] = counts.get(kind, 0) + 1
        ratio = self.local_parameter_bytes / self.parameter_bytes if self.parameter_bytes else 1.0
        return [
            f"tensor parallel {self.world_size}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
            f"parameter bytes per rank: {self.local_parameter_bytes:,} of {self.parameter_bytes:,} ({ratio:.3f})",
        ]


SPATIAL_META_KEY = "npu_dit.spatial"  # gm.meta key of the SpatialPlan


@dataclasses.dataclass
class SpatialPlan:
    """What the spatial pass decided for a convolutional graph on one rank: shard one input's height
    into contiguous bands of whole `align`-row units (`align` = the graph's total downsampling, so
    every strided convolution sees bands on its stride), and gather the listed outputs along height.

    The rewritten graph takes, after the original inputs, the band units of every rank (ints).
    `min_units` is the fewest units a band may hold so that every halo fits in one neighbour's band;
    inputs that give a rank fewer (or a height `align` does not divide) run the captured graph instead.
    """

    world_size: int
    rank: int
    input_index: int  # placeholder index of the sharded tensor
    dim: int  # its height dim
    align: int
    min_units: int
    local_symints: list[int]  # SymInt placeholders equal to the input's height: given the band's rows
    outputs: list[tuple[int, int]]  # (output index, height dim) gathered along height
    input_name: str = ""
    streams: list = dataclasses.field(default_factory=list)  # none: the backend's token-stream warnings

    def fingerprint(self) -> str:
        return repr(("spatial", self.world_size, self.input_index, self.dim, self.align, self.min_units,
                     self.local_symints, self.outputs))

    def describe(self) -> list[str]:
        gathered = ", ".join(f"output {i} dim {d}" for i, d in self.outputs) or "none"
        return [
            f"input {self.input_name or self.input_index} dim {self.dim}: {self.world_size} contiguous row bands "
            f"of whole {self.align}-row units (at least {self.min_units} unit(s) per rank)",
            f"gathered along height: {gathered}",
        ]
