"""Traceable collectives for Ulysses sequence parallelism.

The Ulysses pass inserts calls to these functions into the FX graph. Each collective is split into a
`*_start` call (layout the tensor, issue the functional collective — `_c10d_functional.*`, which
returns at once) and a `*_wait` call (`wait_tensor`, then restore the layout), so the async scheduling
pass can move independent compute between the two. Everything here is functional and traceable:
a rewritten graph can be handed to Dynamo/Inductor again.

Sequence lengths need not divide the world size (Ulysses-Anything): rank j holds chunk j of
`torch.tensor_split(stream, world)`, of length `(L + world - 1 - j) // world`, and the all-to-alls
use those uneven split sizes. Head counts need not divide either: heads are zero-padded to a multiple
of the world size before the exchange and stripped after (a zero head attends uniformly to zero
values, so the padding never leaks into real heads). Gloo cannot all-gather uneven tensors, so the
uneven gathers along the sequence are all-to-alls that send the same chunk to every rank.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from npu_dit.runtime.planes import record_traced

c10d = torch.ops._c10d_functional


def chunk_lengths(length: int, world: int) -> list[int]:
    """Lengths of `torch.tensor_split(x, world)` pieces of a dim of `length` (works on SymInts)."""
    return [(length + world - 1 - j) // world for j in range(world)]


def add_lengths(*lists: Sequence[int]) -> list[int]:
    """Per-rank sums: the local length of a run made of several sharded streams."""
    return [sum(values) for values in zip(*lists)]


def grid_chunk_lengths(rows: int, cols: int, world: int) -> list[int]:
    """Per-rank token counts of a patch grid (`rows` x `cols` tokens, row-major) when rank j holds
    chunk j of `tensor_split` over whole rows: a contiguous run of the sequence."""
    return [n * cols for n in chunk_lengths(rows, world)]


# The cuts below take every rank's share as an argument where the graph has it (`counts`: the
# stream's chunk-lengths node, `grid_chunk_lengths`' token counts), which is what `chunk_lengths`
# would compute from the whole length; given, a cut's shape holds the share itself (the local-length
# symbol of the Ulysses pass's shapes) rather than a floor division of the whole length.


def _row_counts(rows: int, cols: int, world: int, counts: Sequence[int] | None) -> list[int]:
    """Per-rank patch rows of a grid: from its per-rank token counts where given."""
    return chunk_lengths(rows, world) if counts is None else [n // cols for n in counts]


def localize_rows(x: torch.Tensor, dim: int, rows: int, cols: int, world: int, rank: int,
                  counts: Sequence[int] | None = None) -> torch.Tensor:
    """Replicate -> Shard for patch-grid tokens along `dim`: this rank's run of whole patch rows
    (`counts`: every rank's token count, `grid_chunk_lengths(rows, cols, world)`)."""
    if counts is None:
        counts = grid_chunk_lengths(rows, cols, world)
    return x.narrow(dim, sum(counts[:rank]), counts[rank])


def patch_rows_input(x: torch.Tensor, dim: int, rows: int, patch: int, world: int, rank: int,
                     cols: int = 1, counts: Sequence[int] | None = None) -> torch.Tensor:
    """The rows of a patch convolution's input (kernel == stride == `patch` along `dim`, no padding)
    that make this rank's patch rows, so the convolution computes only those. A rank holding no row
    (fewer patch rows than ranks) convolves the last row, which `patch_rows_output` drops: no
    convolution runs on an empty input."""
    row_counts = _row_counts(rows, cols, world, counts)
    first = torch.sym_min(sum(row_counts[:rank]), rows - 1)
    return x.narrow(dim, first * patch, torch.sym_max(row_counts[rank], 1) * patch)


def patch_rows_output(y: torch.Tensor, dim: int, rows: int, world: int, rank: int,
                      cols: int = 1, counts: Sequence[int] | None = None) -> torch.Tensor:
    """This rank's patch rows of the convolution of `patch_rows_input` (all of it, unless empty)."""
    row_counts = _row_counts(rows, cols, world, counts)
    start = sum(row_counts[:rank])
    return y.narrow(dim, start - torch.sym_min(start, rows - 1), row_counts[rank])


def padded_heads(num_heads: int, world: int) -> int:
    return -(-num_heads // world) * world


def pad_heads(x: torch.Tensor, head_dim: int, num_padded: int) -> torch.Tensor:
    missing = num_padded - x.shape[head_dim]
    if missing == 0:
        return x
    dim = head_dim % x.dim()
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, missing]
    return F.pad(x, pad)


def strip_heads(x: torch.Tensor, head_dim: int, num_heads: int) -> torch.Tensor:
    if x.shape[head_dim] == num_heads:
        return x
    return x.narrow(head_dim, 0, num_heads)


def local_heads(x: torch.Tensor, head_dim: int, world: int, rank: int) -> torch.Tensor:
    """Replicated tokens need no exchange: each rank keeps its own slice of the (padded) heads."""
    per_rank = x.shape[head_dim] // world
    return x.narrow(head_dim, rank * per_rank, per_rank)


def local_chunk(x: torch.Tensor, dim: int, world: int, rank: int) -> torch.Tensor:
    """Replicate -> Shard: this rank's `tensor_split` chunk of a full tensor (no communication)."""
    return torch.tensor_split(x, world, dim)[rank]


def localize(
    x: torch.Tensor, dim: int, lengths: Sequence[int], sharded: Sequence[bool], world: int, rank: int,
    shares: Sequence[Sequence[int] | None] | None = None,
) -> torch.Tensor:
    """Take this rank's chunk of every sharded piece of a full dim (pieces of `lengths` along `dim`).

    A single sharded piece is plain `local_chunk`; replicated pieces are kept whole. `shares[i]`,
    where given, is every rank's chunk length of piece i (its stream's chunk-lengths node): the
    chunk is cut by it, the same cut `tensor_split` makes.
    """
    shares = shares or [None] * len(lengths)

    def chunk(piece: torch.Tensor, share: Sequence[int] | None) -> torch.Tensor:
        if share is None:
            return local_chunk(piece, dim, world, rank)
        return piece.narrow(dim, sum(share[:rank]), share[rank])

    if len(lengths) == 1:
        return chunk(x, shares[0]) if sharded[0] else x
    parts = torch.split(x, list(lengths), dim)
    kept = [chunk(p, sh) if s else p for p, s, sh in zip(parts, sharded, shares)]
    return torch.cat(kept, dim)


# --- sequence-sharded -> head-sharded (Q, K, V) ----------------------------------------------------


def seq_to_heads_start(
    x: torch.Tensor, seq_dim: int, head_dim: int, recv_lengths: Sequence[int], world: int, group_name: str
) -> torch.Tensor:
    """[.., S_local, .., H, ..] -> issue the all-to-all that gathers the sequence and scatters heads."""
    x = x.movedim((head_dim, seq_dim), (0, 1))  # [H, S_local, *rest]
    heads, seq = x.shape[0], x.shape[1]
    rest = x.shape[2:]
    x = x.reshape(world, heads // world, seq, *rest).transpose(1, 2)  # [world, S_local, H/world, *rest]
    x = x.reshape(world * seq, heads // world, *rest).contiguous()
    record_traced(group_name, x, "all_to_all")
    return c10d.all_to_all_single(x, list(recv_lengths), [seq] * world, group_name)


def seq_to_heads_wait(y: torch.Tensor, seq_dim: int, head_dim: int) -> torch.Tensor:
    """-> [.., S_full, .., H/world, ..] in the input's layout (sequence in rank order)."""
    y = c10d.wait_tensor(y)  # [S_full, H/world, *rest]
    return y.transpose(0, 1).movedim((0, 1), (head_dim, seq_dim))


def seq_to_heads_qkv_start(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_dim: int, head_dim: int, recv_lengths: Sequence[int],
    world: int, group_name: str,
) -> torch.Tensor:
    """Q, K and V of one attention site in ONE all-to-all (sync Ulysses): each is laid out as
    `seq_to_heads_start` lays it out, the three are interleaved per token ([world * S_local, 3, H/world,
    *rest]), so every rank receives its heads of all three for every token in one message."""
    parts = []
    for x in (q, k, v):
        x = x.movedim((head_dim, seq_dim), (0, 1))  # [H, S_local, *rest]
        heads, seq = x.shape[0], x.shape[1]
        parts.append(x.reshape(world, heads // world, seq, *x.shape[2:]).transpose(1, 2))  # [world, S_local, H/w, *rest]
    x = torch.stack(parts, 2)  # [world, S_local, 3, H/world, *rest], contiguous
    x = x.reshape(world * seq, *x.shape[2:])
    record_traced(group_name, x, "all_to_all")
    return c10d.all_to_all_single(x, list(recv_lengths), [seq] * world, group_name)


def seq_to_heads_qkv_wait(y: torch.Tensor, seq_dim: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (q, k, v), each [.., S_full, .., H/world, ..] as `seq_to_heads_wait` returns it (views)."""
    y = c10d.wait_tensor(y)  # [S_full, 3, H/world, *rest]
    return tuple(y.select(1, i).transpose(0, 1).movedim((0, 1), (head_dim, seq_dim)) for i in range(3))


# --- head-sharded -> sequence-sharded (attention output) -------------------------------------------


def heads_to_seq_start(
    y: torch.Tensor, seq_dim: int, head_dim: int, send_lengths: Sequence[int], world: int, rank: int, group_name: str
) -> torch.Tensor:
    """[.., S_full, .., H/world, ..] -> send each rank its tokens back, with this rank's heads."""
    y = y.movedim((head_dim, seq_dim), (0, 1)).transpose(0, 1).contiguous()  # [S_full, H/world, *rest]
    local = send_lengths[rank]
    record_traced(group_name, y, "all_to_all")
    return c10d.all_to_all_single(y, [local] * world, list(send_lengths), group_name)


def heads_to_seq_wait(z: torch.Tensor, seq_dim: int, head_dim: int, world: int) -> torch.Tensor:
    """-> [.., S_local, .., H, ..] (heads of rank i at [i*H/world, (i+1)*H/world))."""
    z = c10d.wait_tensor(z)  # [world * S_local, H/world, *rest]
    per_rank_heads = z.shape[1]
    rest = z.shape[2:]
    z = z.reshape(world, -1, per_rank_heads, *rest).transpose(0, 1)  # [S_local, world, H/world, *rest]
    z = z.reshape(z.shape[0], world * per_rank_heads, *rest).transpose(0, 1)  # [H, S_local, *rest]
    return z.movedim((0, 1), (head_dim, seq_dim))


# --- gathers ---------------------------------------------------------------------------------------


def gather_heads_start(y: torch.Tensor, head_dim: int, world: int, group_name: str) -> torch.Tensor:
    """Replicated tokens after attention: all-gather the head slices (even: every rank has H/world)."""
    y = y.movedim(head_dim, 0).contiguous()
    record_traced(group_name, y, "all_gather")
    return c10d.all_gather_into_tensor(y, world, group_name)


def gather_heads_wait(z: torch.Tensor, head_dim: int) -> torch.Tensor:
    return c10d.wait_tensor(z).movedim(0, head_dim)


def gather_seq_start(
    x: torch.Tensor, seq_dim: int, recv_lengths: Sequence[int], world: int, group_name: str
) -> torch.Tensor:
    """All-gather uneven sequence chunks (e.g. a mask's key axis) as an all-to-all: Gloo-safe."""
    x = x.movedim(seq_dim, 0)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    local = x.shape[0]
    x = x.unsqueeze(0).expand(world, *x.shape).reshape(world * local, *x.shape[1:]).contiguous()
    record_traced(group_name, x, "all_gather (as all_to_all)")
    return c10d.all_to_all_single(x, list(recv_lengths), [local] * world, group_name)


def gather_seq_wait(z: torch.Tensor, seq_dim: int, dtype: torch.dtype) -> torch.Tensor:
    return c10d.wait_tensor(z).to(dtype).movedim(0, seq_dim)


COLLECTIVE_STARTS = (seq_to_heads_start, heads_to_seq_start, gather_heads_start, gather_seq_start,
                     seq_to_heads_qkv_start)
COLLECTIVE_WAITS = (seq_to_heads_wait, heads_to_seq_wait, gather_heads_wait, gather_seq_wait, seq_to_heads_qkv_wait)


# --- tensor parallelism ----------------------------------------------------------------------------


def feature_block(x: torch.Tensor, dim: int, segs: Sequence[int], world: int, rank: int) -> torch.Tensor:
    """Replicate -> Shard on a feature dim: this rank's block of every segment (see plans.feature_blocks)."""
    from npu_dit.plans import feature_blocks

    pieces = [x.narrow(dim, start, length) for start, length in feature_blocks(tuple(segs), world, rank)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def tp_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Partial sums of a row-sharded linear -> the full result on every rank of the TP group."""
    record_traced(group_name, x, "all_reduce")
    return c10d.wait_tensor(c10d.all_reduce(x.contiguous(), "sum", group_name))


def tp_all_gather_last(x: torch.Tensor, world: int, group_name: str) -> torch.Tensor:
    """Column blocks of a linear's output -> the full output (blocks in rank order on the last dim)."""
    record_traced(group_name, x, "all_gather")
    y = c10d.all_gather_into_tensor(x.movedim(-1, 0).contiguous(), world, group_name)
    return c10d.wait_tensor(y).movedim(0, -1)


# dim_flow's rule for these graph calls: which dim of the first argument they change (None: none)
feature_block.npu_dit_changed_dim = lambda node: node.args[1]  # type: ignore[attr-defined]
tp_all_reduce.npu_dit_changed_dim = lambda node: None  # type: ignore[attr-defined]
tp_all_gather_last.npu_dit_changed_dim = lambda node: -1  # type: ignore[attr-defined]
