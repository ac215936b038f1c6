"""Ulysses all-to-alls in FP8 (`comm_dtype="float8_e4m3fn"`): Q, V and the attention output travel as
float8_e4m3fn with one scale per tensor and head; K may travel beside them in the compute dtype.

Each message is bytes (uint8), so Gloo, which has no float8 type, carries it as it carries any other
tensor, and one message holds everything for a destination: the FP8 values, the raw bytes of an
uncompressed operand, and a *scale row* — one extra token row per destination whose first bytes, in
each head's slot, hold that head's scales in the compute dtype:

    seq->heads, to rank r:  [scale row | S_local token rows]   rows = [H/P, *rest[:-1], D_bytes]
    heads->seq, to rank r:  [scale row | rank r's tokens]

The scale of a head is amax(|x|) / 448 over the tokens this rank sends (Q and V: its own tokens of
the heads going to one destination; the output: all tokens of its heads), so no value saturates and
the largest one uses the full FP8 range; a head of zeros gets the dtype's smallest normal number.
The receiver multiplies back. A scale row costs one token per destination; with D = 128 and bfloat16
the bytes per site are (1 + 2 + 1 + 1) / (2 + 2 + 2 + 2) = 0.625 of the uncompressed exchange, plus
that row. Every function is functional and traceable, like `collectives.py`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from npu_dit.runtime.planes import record_traced

c10d = torch.ops._c10d_functional
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
COMM_DTYPES = {"float8_e4m3fn": FP8}


def _scales(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (amax.float() / FP8_MAX).clamp(min=torch.finfo(dtype).tiny).to(dtype)


def _quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8 bytes of x / scale (scale broadcast against x)."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)


def _scale_row(scales: torch.Tensor, slot_shape: Sequence[int]) -> torch.Tensor:
    """[*lead, H, n] scales -> [*lead, 1, H, *slot_shape] uint8: head h's scale bytes at the start of its slot."""
    raw = scales.contiguous().view(torch.uint8)  # [*lead, H, n * itemsize]
    slot = 1
    for size in slot_shape:
        slot = slot * size
    raw = F.pad(raw, (0, slot - raw.shape[-1]))
    return raw.reshape(*raw.shape[:-2], 1, raw.shape[-2], *slot_shape)


def _read_scales(row: torch.Tensor, slot_dims: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `_scale_row`: a row [*lead, H, *slot] (`slot_dims` dims) -> [*lead, H, count] in `dtype`."""
    flat = row.flatten(row.dim() - slot_dims) if slot_dims > 1 else row
    return flat[..., : count * dtype.itemsize].contiguous().view(dtype)


# --- sequence-sharded -> head-sharded (Q, K, V) ----------------------------------------------------


def seq_to_heads_packed_start(
    xs: Sequence[torch.Tensor], compressed: Sequence[bool], seq_dim: int, head_dim: int, recv_lengths: Sequence[int],
    world: int, group_name: str,
) -> torch.Tensor:
    """One or more operands of one attention site (`collectives.seq_to_heads_start`'s exchange, Q/K/V
    in one message when several), those flagged in `compressed` in FP8, the others as raw bytes."""
    parts, scales = [], []
    for x, fp8 in zip(xs, compressed):
        x = x.movedim((head_dim, seq_dim), (0, 1))  # [H, S_local, *rest]
        heads, seq = x.shape[0], x.shape[1]
        x = x.reshape(world, heads // world, seq, *x.shape[2:]).transpose(1, 2).contiguous()  # [W, S_local, H/W, *rest]
        if fp8:
            amax = x.abs().amax(dim=tuple(range(3, x.dim()))) if x.dim() > 3 else x.abs()  # [W, S_local, H/W]
            amax = F.pad(amax, (0, 0, 0, 1)).amax(1)  # [W, H/W]; the zero row keeps a rank without tokens valid
            scale = _scales(amax, x.dtype)
            scales.append(scale)
            x = _quantize(x, scale.view(world, 1, heads // world, *[1] * (x.dim() - 3)))
        else:
            x = x.view(torch.uint8)
        parts.append(x)
    data = torch.cat(parts, -1) if len(parts) > 1 else parts[0]  # [W, S_local, H/W, *rest[:-1], bytes]
    row = _scale_row(torch.stack(scales, -1), data.shape[3:])  # [W, 1, H/W, *rest[:-1], bytes]
    send = torch.cat([row, data], 1)
    send = send.reshape(world * (seq + 1), *send.shape[2:])
    record_traced(group_name, send, "all_to_all")
    return c10d.all_to_all_single(send, [n + 1 for n in recv_lengths], [seq + 1] * world, group_name)


def seq_to_heads_packed_wait(
    y: torch.Tensor, compressed: Sequence[bool], seq_dim: int, head_dim: int, recv_lengths: Sequence[int],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    """-> one tensor per operand, [.., S_full, .., H/world, ..] as `seq_to_heads_wait` returns it."""
    y = c10d.wait_tensor(y)  # [S_full + W, H/W, *rest[:-1], bytes]
    slot_dims = y.dim() - 2
    pieces = torch.split(y, [n + 1 for n in recv_lengths])
    num_fp8 = sum(1 for c in compressed if c)
    scales = [_read_scales(p[0], slot_dims, num_fp8, dtype) for p in pieces]  # W x [H/W, num_fp8]
    data = torch.cat([p[1:] for p in pieces])  # [S_full, H/W, *rest[:-1], bytes]
    per_token = torch.cat([s.unsqueeze(0).expand(n, *s.shape) for s, n in zip(scales, recv_lengths)])
    width = data.shape[-1] // (num_fp8 + (len(compressed) - num_fp8) * dtype.itemsize)
    outs, offset, index = [], 0, 0
    for fp8 in compressed:
        size = width if fp8 else width * dtype.itemsize
        chunk = data[..., offset : offset + size]
        offset += size
        if fp8:
            scale = per_token[:, :, index].reshape(*per_token.shape[:2], *[1] * slot_dims)
            x = chunk.view(FP8).to(dtype) * scale
            index += 1
        else:
            x = chunk.view(dtype)
        outs.append(x.transpose(0, 1).movedim((0, 1), (head_dim, seq_dim)))
    return tuple(outs)


# --- head-sharded -> sequence-sharded (attention output) -------------------------------------------


def heads_to_seq_fp8_start(
    y: torch.Tensor, seq_dim: int, head_dim: int, send_lengths: Sequence[int], world: int, rank: int, group_name: str
) -> torch.Tensor:
    """`collectives.heads_to_seq_start` in FP8, a scale per head of this rank over all its tokens."""
    y = y.movedim((head_dim, seq_dim), (0, 1)).transpose(0, 1).contiguous()  # [S_full, H/W, *rest]
    heads = y.shape[1]
    amax = y.abs().amax(dim=tuple(range(2, y.dim()))) if y.dim() > 2 else y.abs()  # [S_full, H/W]
    scale = _scales(amax.amax(0), y.dtype)  # [H/W]
    data = _quantize(y, scale.view(1, heads, *[1] * (y.dim() - 2)))
    row = _scale_row(scale.view(heads, 1), data.shape[2:])  # [1, H/W, *rest]
    send = torch.cat([t for chunk in torch.split(data, list(send_lengths)) for t in (row, chunk)])
    local = send_lengths[rank]
    record_traced(group_name, send, "all_to_all")
    return c10d.all_to_all_single(send, [local + 1] * world, [n + 1 for n in send_lengths], group_name)


def heads_to_seq_fp8_wait(z: torch.Tensor, seq_dim: int, head_dim: int, world: int, dtype: torch.dtype) -> torch.Tensor:
    """-> [.., S_local, .., H, ..] as `collectives.heads_to_seq_wait` returns it."""
    z = c10d.wait_tensor(z)  # [W * (S_local + 1), H/W, *rest]
    heads, rest = z.shape[1], z.shape[2:]
    z = z.reshape(world, -1, heads, *rest)
    scales = _read_scales(z[:, 0], len(rest), 1, dtype)  # [W, H/W, 1]
    z = z[:, 1:].view(FP8).to(dtype) * scales.reshape(world, 1, heads, *[1] * len(rest))  # [W, S_local, H/W, *rest]
    z = z.transpose(0, 1)
    z = z.reshape(z.shape[0], world * heads, *rest).transpose(0, 1)  # [H, S_local, *rest]
    return z.movedim((0, 1), (head_dim, seq_dim))


STARTS = (seq_to_heads_packed_start, heads_to_seq_fp8_start)
WAITS = (seq_to_heads_packed_wait, heads_to_seq_fp8_wait)
