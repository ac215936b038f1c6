"""Shape rules for the calls the Ulysses rewrite inserts: (sizes, dtype, device) of the output from
the arguments' fake values, so the local-shape refresh needs no fake dispatch through a collective
helper's dozen layout ops (a collective's fake tensors cost about as much as the real op's tracing).

Each rule mirrors its helper in `runtime/collectives.py` (and SDPA's output rule); the strict mode
(`NPU_DIT_LINT=1`) checks every node against a full fake propagation, and a call a rule does not
cover (it raises) is simply run."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from npu_dit.passes.analysis.attention_ops import SDPA_TARGETS
from npu_dit.passes.ops.shapes import SHAPE_RULES
from npu_dit.runtime import collectives as C
from npu_dit.runtime import spatial_ops as S
from npu_dit.plans import feature_blocks


def _move_to_front(shape: Sequence[Any], first: int, second: int) -> list[Any]:
    """`x.movedim((first, second), (0, 1))`'s shape."""
    ndim = len(shape)
    first, second = first % ndim, second % ndim
    return [shape[first], shape[second]] + [s for d, s in enumerate(shape) if d not in (first, second)]


def _move_from_front(shape: Sequence[Any], first: int, second: int) -> list[Any]:
    """`x.movedim((0, 1), (first, second))`'s shape."""
    ndim = len(shape)
    first, second = first % ndim, second % ndim
    rest = iter(shape[2:])
    return [shape[0] if d == first else shape[1] if d == second else next(rest) for d in range(ndim)]


def _set(shape: Sequence[Any], dim: int, size: Any) -> list[Any]:
    out = list(shape)
    out[dim % len(out)] = size
    return out


def pad_heads(x, head_dim, num_padded):
    return _set(x.shape, head_dim, num_padded), x.dtype, x.device


def strip_heads(x, head_dim, num_heads):
    return _set(x.shape, head_dim, num_heads), x.dtype, x.device


def local_heads(x, head_dim, world, rank):
    return _set(x.shape, head_dim, x.shape[head_dim] // world), x.dtype, x.device


def seq_to_heads_start(x, seq_dim, head_dim, recv_lengths, world, group_name):
    heads, _, *rest = _move_to_front(x.shape, head_dim, seq_dim)
    return [sum(recv_lengths), heads // world, *rest], x.dtype, x.device


def seq_to_heads_wait(y, seq_dim, head_dim):
    seq, heads, *rest = y.shape
    return _move_from_front([heads, seq, *rest], head_dim, seq_dim), y.dtype, y.device


def heads_to_seq_start(y, seq_dim, head_dim, send_lengths, world, rank, group_name):
    heads, _, *rest = _move_to_front(y.shape, head_dim, seq_dim)
    return [send_lengths[rank] * world, heads, *rest], y.dtype, y.device


def heads_to_seq_wait(z, seq_dim, head_dim, world):
    total, heads, *rest = z.shape
    return _move_from_front([heads * world, total // world, *rest], head_dim, seq_dim), z.dtype, z.device


def gather_heads_start(y, head_dim, world, group_name):
    heads, *rest = [y.shape[head_dim % y.dim()]] + [s for d, s in enumerate(y.shape) if d != head_dim % y.dim()]
    return [heads * world, *rest], y.dtype, y.device


def gather_heads_wait(z, head_dim):
    first, *rest = z.shape
    head_dim = head_dim % z.dim()
    return rest[:head_dim] + [first] + rest[head_dim:], z.dtype, z.device


def gather_seq_start(x, seq_dim, recv_lengths, world, group_name):
    rest = [s for d, s in enumerate(x.shape) if d != seq_dim % x.dim()]
    dtype = torch.uint8 if x.dtype == torch.bool else x.dtype
    return [sum(recv_lengths), *rest], dtype, x.device


def gather_seq_wait(z, seq_dim, dtype):
    first, *rest = z.shape
    seq_dim = seq_dim % z.dim()
    return rest[:seq_dim] + [first] + rest[seq_dim:], dtype, z.device


def localize(x, dim, lengths, sharded, world, rank, shares=None):
    if len(lengths) == 1:  # one piece: the chunk of the whole dim, as `local_chunk` cuts it
        lengths = [x.shape[dim]]
    shares = shares or [None] * len(lengths)
    local = [(C.chunk_lengths(length, world) if share is None else share)[rank] if s else length
             for length, s, share in zip(lengths, sharded, shares)]
    return _set(x.shape, dim, sum(local)), x.dtype, x.device


def attention(query, key, value, *args, **kwargs):
    return list(query.shape[:-1]) + [value.shape[-1]], query.dtype, query.device


RULES: dict[Any, Any] = {
    C.pad_heads: pad_heads, C.strip_heads: strip_heads, C.local_heads: local_heads,
    C.seq_to_heads_start: seq_to_heads_start, C.seq_to_heads_wait: seq_to_heads_wait,
    C.heads_to_seq_start: heads_to_seq_start, C.heads_to_seq_wait: heads_to_seq_wait,
    C.gather_heads_start: gather_heads_start, C.gather_heads_wait: gather_heads_wait,
    # gather_seq_start (a mask's key axis, grid tokens before the unpatchify): its all-to-all's output is
    # new and contiguous, `sum(recv_lengths)` long, as the collective's own meta makes it (the unpatchify's
    # -1 size is inferred from that sum); the wait's `movedim` view is run on it (its strides)
    C.gather_seq_start: gather_seq_start,
    C.localize: localize,
    **{target: attention for target in SDPA_TARGETS},
}


# --- tensor parallelism: the one inserted helper whose value is not an old node's ----------------


def feature_block(x, dim, segs, world, rank):
    return _set(x.shape, dim, sum(length for _, length in feature_blocks(tuple(segs), world, rank))), x.dtype, x.device


TP_RULES: dict[Any, Any] = {C.feature_block: feature_block}


# --- spatial parallelism (runtime/spatial_ops.py): the helpers that dominate a VAE's refresh ------


def spatial_group_norm(x, num_groups, weight, bias, eps, group_name, world):
    return list(x.shape), x.dtype, x.device


def _conv_size(size, kernel, stride, padding, dilation):
    reach = dilation * (kernel - 1)
    if stride == 1:  # no floor division in the shape of a stride-1 convolution
        return size + 2 * padding - reach
    return (size + 2 * padding - reach - 1) // stride + 1


def spatial_halo_conv(x, received, weight, bias, stride, padding, dilation, groups, dim, rows, rank, world):
    """A stride-1 convolution of the band with its halo: the rows of the convolution's own padding
    (the thin-band path, halo attached and no padding along `dim`, gives the same count)."""
    spatial = [_conv_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
               for i in range(x.dim() - 2)]
    return [x.shape[0], weight.shape[0], *spatial], x.dtype, x.device


def spatial_neighbour_rows(x, dim, top, bottom, rank, world, group_name):
    count = (top if rank > 0 else 0) + (bottom if rank < world - 1 else 0)
    rest = [s for d, s in enumerate(x.shape) if d != dim % x.dim()]
    return [count, *rest], x.dtype, x.device


def spatial_halo_exchange(x, dim, top, bottom, edge_top, edge_bottom, rank, world, group_name):
    """The band with the neighbours' rows around it (zero rows at the global edges)."""
    dim = dim % x.dim()
    above = top if rank > 0 else edge_top
    below = bottom if rank < world - 1 else edge_bottom
    return _set(x.shape, dim, x.shape[dim] + above + below), x.dtype, x.device


def spatial_edge_pad(x, pad, value, pad_index, rank, world):
    """`F.pad` with the rows' pair kept only at the global edges (`spatial_ops.edge_pad`)."""
    pad = list(pad)
    if rank > 0:
        pad[pad_index] = 0
    if rank < world - 1:
        pad[pad_index + 1] = 0
    return SHAPE_RULES[F.pad](x, pad)


def spatial_gather_rows_start(x, dim, units, rank, world, group_name):
    per_unit = x.shape[dim] // units[rank]
    rest = [s for d, s in enumerate(x.shape) if d != dim % x.dim()]
    return [sum(per_unit * u for u in units), *rest], x.dtype, x.device


def spatial_gather_rows_wait(y, dim):
    first, *rest = y.shape  # y.movedim(0, dim)
    dim = dim % y.dim()
    return rest[:dim] + [first] + rest[dim:], y.dtype, y.device


SPATIAL_RULES: dict[Any, Any] = {
    S.group_norm: spatial_group_norm, S.halo_conv: spatial_halo_conv, S.neighbour_rows: spatial_neighbour_rows,
    S.halo_exchange: spatial_halo_exchange, S.edge_pad: spatial_edge_pad,
    S.gather_rows_start: spatial_gather_rows_start, S.gather_rows_wait: spatial_gather_rows_wait,
    # attention over the gathered keys/values (one or two calls, but a symbolic SDPA is ~1 s of fake dispatch)
    **{target: attention for target in SDPA_TARGETS},
    # padding and nearest upsampling whose inputs changed (passes/ops/shapes.py)
    **SHAPE_RULES,
}
