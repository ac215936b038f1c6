"""The executor: what runs on every rank, every step, around the rewritten graph.

It turns the 0-d scalar inputs the graph now takes as numbers into numbers (`scalar_inputs` pass),
and, under Ulysses, shards each input along its inferred token dim (`tensor_split` chunk `rank`),
refreshes the SymInt inputs that are local lengths, appends the global stream lengths the rewritten
graph asks for, runs the compiled graph, and gathers the outputs along their token dims. Gloo cannot
all-gather uneven tensors, so outputs are padded to the longest chunk, gathered, and trimmed.
Under tensor parallelism it feeds this rank's weight shards in place of the sharded parameters
(`runtime/weights.py`); inputs and outputs stay replicated over the TP group.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from npu_dit.plans import ShardingPlan, TensorParallelPlan
from npu_dit.errors import RankMismatchError
from npu_dit.runtime.agreement import CALL, call_signature, check_records, exchange
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
    ) -> None:
        self.compiled = compiled
        self.scalar_inputs = tuple(scalar_inputs)
        self.plan = plan
        self.ctx = ctx
        self.feed_weights = WeightFeeder(weights) if weights is not None and weights.shards else None

    def __call__(self, *args: Any) -> Any:
        if self.feed_weights is not None:  # this rank's tensor-parallel shards for the sharded parameters
            args = self.feed_weights(args)
        if self.scalar_inputs:
            args = list(args)
            for index in self.scalar_inputs:
                args[index] = args[index].item()
        if self.plan is None and self.feed_weights is None:
            return self.compiled(*args)
        refuse_grad(args, COLLECTIVES)
        signature = call_signature(args)
        try:
            # every rank must run the same global shapes: one small all-gather, compared on every rank
            check_records(exchange(CALL, signature), CALL, f"inputs {signature}")
            if self.plan is None:  # tensor parallelism alone: replicated inputs and outputs
                return self.compiled(*args)
            local_args, global_lengths = self.shard_args(args)
            outputs = self.compiled(*local_args)
            return self.gather_outputs(outputs, global_lengths)
        except RuntimeError as exc:
            if isinstance(exc, (DistributedRunError, RankMismatchError)) or not _looks_distributed(exc):
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
            tensor = args[index]
            length = tensor.shape[dim]
            if global_lengths.setdefault(stream, length) != length:
                raise ValueError(
                    f"inputs of token stream {stream} disagree on its length ({global_lengths[stream]} vs "
                    f"{length} at input {index} dim {dim})"
                )
            local[index] = local_chunk(tensor, dim, world, rank).contiguous()
        for symint_index, tensor_index, dim in self.plan.local_symints:
            local[symint_index] = local[tensor_index].shape[dim]
        local.extend(global_lengths[s] for s in self.plan.global_lengths)
        return local, global_lengths

    def gather_outputs(self, outputs: Any, global_lengths: dict[int, int]) -> Any:
        if not self.plan.outputs:
            return outputs
        result = list(outputs)
        for gather in self.plan.outputs:
            tensor = result[gather.index]
            per_stream = [chunk_lengths(global_lengths[s], self.ctx.world_size) for s in gather.streams]
            pieces = torch.split(tensor, [lengths[self.ctx.rank] for lengths in per_stream], gather.dim)
            group = process_group(self.ctx)
            gathered = [gather_uneven(p, gather.dim, lengths, group=group) for p, lengths in zip(pieces, per_stream)]
            result[gather.index] = gathered[0] if len(gathered) == 1 else torch.cat(gathered, gather.dim)
        return type(outputs)(result) if isinstance(outputs, tuple) else result



def _looks_distributed(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(
        key in text
        for key in ("gloo", "nccl", "hccl", "connection", "timed out", "timeout", "peer", "c10d", "socket", "broken pipe")
    )


def gather_uneven(tensor: torch.Tensor, dim: int, lengths: list[int], group=None) -> torch.Tensor:
    """All-gather pieces of different lengths along `dim` (padded to the longest, then cut)."""
    longest = max(lengths)
    missing = longest - tensor.shape[dim]
    if missing:
        pad_shape = list(tensor.shape)
        pad_shape[dim] = missing
        tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim)
    slots = [torch.empty_like(tensor) for _ in lengths]
    dist.all_gather(slots, tensor.contiguous(), group=group)
    return torch.cat([slot.narrow(dim, 0, n) for slot, n in zip(slots, lengths)], dim)
