"""The executor: what runs on every rank, every step, around the rewritten graph.

It turns the 0-d scalar inputs the graph now takes as numbers into numbers (`scalar_inputs` pass;
with the cache the controller does it per region, so a cached step reads only the scalars of the
regions it runs), and, under Ulysses, shards each input along its inferred token dim (`tensor_split`
chunk `rank`), refreshes the SymInt inputs that are local lengths, appends the global stream lengths the rewritten
graph asks for, runs the compiled graph, and gathers the outputs along their token dims: one
all-gather per output into a preallocated buffer (every stream's chunk padded to that stream's
longest, packed side by side; Gloo cannot all-gather uneven tensors), then trimmed.
The ranks compare the call's global shapes on the host plane only when the signature is new
(`agreement.ShapeAgreement`).
Under tensor parallelism it feeds this rank's weight shards in place of the sharded parameters
(`runtime/weights.py`); inputs and outputs stay replicated over the TP group.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from npu_dit.plans import ShardingPlan, TensorParallelPlan
from npu_dit.errors import RankMismatchError
from npu_dit.runtime import planes
from npu_dit.runtime.agreement import ShapeAgreement
from npu_dit.runtime.collectives import chunk_lengths, local_chunk
from npu_dit.runtime.dist import ParallelContext, process_group
from npu_dit.runtime.grad import COLLECTIVES, refuse_grad
from npu_dit.runtime.weights import WeightFeeder


class DistributedRunError(RuntimeError):
    """A collective failed: another rank exited, hung past the group timeout, or the link broke."""


class GraphExecutor:
    def __init__(
        self,
        compiled: Callable,
        *,
        scalar_inputs: Sequence[int] = (),
        plan: ShardingPlan | None = None,
        ctx: ParallelContext | None = None,
        weights: TensorParallelPlan | None = None,
        host: str | None = None,
        inner_reads_scalars: bool = False,  # `compiled` is a cache controller: it reads them per region
    ) -> None:
        self.compiled = compiled
        self.scalar_inputs = () if inner_reads_scalars else tuple(scalar_inputs)
        self.plan = plan
        self.ctx = ctx
        self.feed_weights = WeightFeeder(weights) if weights is not None and weights.shards else None
        # this graph's ranks (the world, or a CFG branch); the scalar inputs are numbers, no shape
        self.agree = ShapeAgreement(host, exclude=scalar_inputs)

    def __call__(self, *args: Any) -> Any:
        parallel = self.plan is not None or self.feed_weights is not None
        if parallel:
            refuse_grad(args, COLLECTIVES)
            # every rank must run the same global shapes: compared on the host plane, when they change
            self.agree(args)
        if self.feed_weights is not None:  # this rank's tensor-parallel shards for the sharded parameters
            args = self.feed_weights(args)
        if self.scalar_inputs:
            args = list(args)
            item = torch.Tensor.item
            for index in self.scalar_inputs:
                args[index] = item(args[index])
        if not parallel:
            return self.compiled(*args)
        try:
            if self.plan is None:  # tensor parallelism alone: replicated inputs and outputs
                return self.compiled(*args)
            local_args, global_lengths = self.shard_args(args)
            outputs = self.compiled(*local_args)
            return self.gather_outputs(outputs, global_lengths)
        except RuntimeError as exc:
            if isinstance(exc, (DistributedRunError, RankMismatchError, planes.PlaneError)) or not _looks_distributed(exc):
                raise
            ctx = self.ctx or self.feed_weights.plan
            backend = getattr(self.ctx, "backend", dist.get_backend())
            raise DistributedRunError(
                f"npu_dit: rank {dist.get_rank()} of {dist.get_world_size()} ({backend}): a collective "
                f"failed: {str(exc).splitlines()[0]}. Another rank has probably exited or is stuck (group "
                f"timeout {getattr(ctx, 'timeout_s', 0):.0f} s, {getattr(ctx, 'timeout_source', '')}); the run is aborted."
            ) from exc

    def shard_args(self, args: Sequence[Any]) -> tuple[list[Any], dict[int, int]]:
        world, rank = self.ctx.world_size, self.ctx.rank
        local = list(args)
        global_lengths: dict[int, int] = {}
        for index, dim, stream in self.plan.shard_inputs:
            length = args[index].shape[dim]
            if global_lengths.setdefault(stream, length) != length:
                raise ValueError(
                    f"inputs of token stream {stream} disagree on its length ({global_lengths[stream]} vs "
                    f"{length} at input {index} dim {dim})"
                )
            # (an input sharded on two dims, a mask [B, 1, N, N], is cut on both)
            local[index] = local_chunk(local[index], dim, world, rank).contiguous()
        for symint_index, tensor_index, dim in self.plan.local_symints:
            local[symint_index] = local[tensor_index].shape[dim]
        local.extend(global_lengths[s] for s in self.plan.global_lengths)
        return local, global_lengths

    def gather_outputs(self, outputs: Any, global_lengths: dict[int, int]) -> Any:
        if not self.plan.outputs:
            return outputs
        result = list(outputs)
        group = process_group(self.ctx)
        for gather in self.plan.outputs:
            per_stream = [chunk_lengths(global_lengths[s], self.ctx.world_size) for s in gather.streams]
            result[gather.index] = gather_streams(result[gather.index], gather.dim, per_stream, self.ctx.rank, group)
        return type(outputs)(result) if isinstance(outputs, tuple) else result



def _looks_distributed(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(
        key in text
        for key in ("gloo", "nccl", "hccl", "connection", "timed out", "timeout", "peer", "c10d", "socket", "broken pipe")
    )


def gather_uneven(tensor: torch.Tensor, dim: int, lengths: list[int], group=None) -> torch.Tensor:
    """All-gather pieces of different lengths along `dim` (padded to the longest, then cut)."""
    return gather_streams(tensor, dim, [lengths], dist.get_rank(group), group)


def gather_streams(tensor: torch.Tensor, dim: int, per_stream: list[list[int]], rank: int, group) -> torch.Tensor:
    """This rank's chunks of one or more streams, side by side along `dim`, -> the whole streams in
    the same order, with ONE all-gather: each stream's chunk is placed at that stream's longest chunk
    length in a send buffer (zeros elsewhere), gathered into a preallocated [world, ...] buffer, and
    each rank's chunk cut out. Even chunks of one stream need no padding and no send-side copy."""
    dim = dim % tensor.dim()
    world = len(per_stream[0])
    longest = [max(lengths) for lengths in per_stream]
    mine = [lengths[rank] for lengths in per_stream]
    moved = tensor.movedim(dim, 0)  # gathers concatenate along dim 0
    if mine == longest and len(per_stream) == 1:
        send = moved.contiguous()
    else:
        send = moved.new_zeros((sum(longest), *moved.shape[1:]))
        src = dst = 0
        for have, room in zip(mine, longest):
            send[dst:dst + have] = moved[src:src + have]
            src, dst = src + have, dst + room
    buffer = send.new_empty((world * send.shape[0], *send.shape[1:]))
    planes.data_all_gather_into_tensor(buffer, send, group, "output gather")
    slots = buffer.view(world, send.shape[0], *send.shape[1:])
    pieces = []
    offset = 0
    for lengths, room in zip(per_stream, longest):
        pieces.extend(slots[r, offset:offset + n] for r, n in enumerate(lengths))
        offset += room
    if len(pieces) == world and all(n == longest[0] for n in per_stream[0]):
        whole = buffer  # one stream, even chunks: the buffer is the result (a view, no copy)
    else:
        whole = torch.cat(pieces, 0)
    return with_layout_of(whole.movedim(0, dim), tensor)


def with_layout_of(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` with the dim order in memory that `like` has (a copy only where it differs). A gathered
    output is the serial output's values, and it must also have its layout: the caller's next frame may
    `view` it (HiDream's MoE gate: `x.view(-1, D)` of a block's output), which a gather along a later
    dim (`movedim` of the gather buffer) would make fail or, traced by Dynamo, refuse."""
    if like.is_contiguous():
        return value.contiguous()
    order = sorted(range(like.dim()), key=lambda d: -like.stride(d))  # outermost dim first
    if value.permute(order).is_contiguous():
        return value
    out = torch.empty_permuted(value.shape, order, dtype=value.dtype, device=value.device)
    return out.copy_(value)
