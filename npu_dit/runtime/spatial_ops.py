"""Traceable collectives for spatial (height-band) parallelism of convolutional graphs (the VAE).

The spatial pass inserts calls to these functions into the FX graph. Rank r of P holds a contiguous
band of rows of every feature map (rows [b_r, b_{r+1}) in that map's coordinates); what each op needs
from outside its band it gets here, exactly:

- `halo_exchange` before a convolution with a kernel taller than one row: the last `top` rows of the
  rank above and the first `bottom` rows of the rank below, in ONE uneven all-to-all (every rank sends
  to its two neighbours only; Gloo, NCCL and HCCL all take zero split sizes). At the global edges the
  rows are the convolution's own zero padding.
- `neighbour_rows` + `halo_conv` for a 'same' convolution (stride 1, padding = the rows its kernel
  reads either side): the band is convolved as it is, with the conv's zero padding, and only its first
  and last `rows` output rows are redone from the neighbours' rows — no taller copy of the band.
- `edge_pad`: an explicit `F.pad` along the height pads only at the global edges (rank 0's top, the
  last rank's bottom); interior bands are continued by the next convolution's halo instead.
- `group_norm`: per-group count, mean and M2 (sum of squared deviations) of the local band in float32,
  all-gathered and merged with Chan's parallel formula: the serial mean and (biased) variance, without
  the cancellation of sum / sum-of-squares.
- `gather_rows_start/wait`: keys and values of attention over pixels, gathered along the (flattened)
  row axis in rank order. Band sizes differ between ranks; the lengths are computed from the band
  units (`units[j]` rows per unit of the input, the same scale on every rank) and the gather is an
  all-to-all that sends the same chunk to every rank (Gloo cannot all-gather uneven tensors).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from npu_dit.runtime.planes import record_traced

c10d = torch.ops._c10d_functional


def band_units(height: int, align: int, world: int) -> list[int]:
    """Units of `align` rows per rank: contiguous bands, `tensor_split` of ceil(height / align) units."""
    units = -(-height // align)
    return [(units + world - 1 - j) // world for j in range(world)]


def band_rows(height: int, align: int, world: int) -> list[int]:
    """Rows of the input per rank (the last band takes what is left when `align` does not divide)."""
    rows = [u * align for u in band_units(height, align, world)]
    rows[-1] = height - sum(rows[:-1])
    return rows


def neighbour_rows(
    x: torch.Tensor, dim: int, top: int, bottom: int, rank: int, world: int, group_name: str,
) -> torch.Tensor:
    """The last `top` rows of the rank above, then the first `bottom` rows of the rank below, rows first
    ([top + bottom, ..]; a band at a global edge receives nothing from that side): ONE uneven all-to-all
    in which every rank sends to its two neighbours only."""
    rows = x.movedim(dim, 0)
    send_up = bottom if rank > 0 else 0  # the rank above needs my first `bottom` rows
    send_down = top if rank < world - 1 else 0  # the rank below needs my last `top` rows
    in_splits = [0] * world
    out_splits = [0] * world
    if rank > 0:
        in_splits[rank - 1], out_splits[rank - 1] = send_up, top
    if rank < world - 1:
        in_splits[rank + 1], out_splits[rank + 1] = send_down, bottom
    n = rows.shape[0]
    send = torch.cat([rows[:send_up], rows[n - send_down:]], 0).contiguous()
    record_traced(group_name, send, "halo all_to_all")
    return c10d.wait_tensor(c10d.all_to_all_single(send, out_splits, in_splits, group_name))


def _with_halo(
    x: torch.Tensor, received: torch.Tensor, dim: int, top: int, edge_top: int, edge_bottom: int,
    rank: int, world: int,
) -> torch.Tensor:
    rows = x.movedim(dim, 0)
    recv_up = top if rank > 0 else 0
    above, below = received[:recv_up], received[recv_up:]
    pieces = []
    if rank == 0 and edge_top:
        pieces.append(rows.new_zeros((edge_top, *rows.shape[1:])))
    pieces += [above, rows, below]
    if rank == world - 1 and edge_bottom:
        pieces.append(rows.new_zeros((edge_bottom, *rows.shape[1:])))
    return torch.cat(pieces, 0).movedim(0, dim)


def halo_exchange(
    x: torch.Tensor, dim: int, top: int, bottom: int, edge_top: int, edge_bottom: int,
    rank: int, world: int, group_name: str,
) -> torch.Tensor:
    """[.., rows, ..] -> [.., top + rows + bottom, ..]: the neighbours' rows around this band.

    `top` rows come from the rank above (its last rows), `bottom` rows from the rank below (its first
    rows); rank 0 gets `edge_top` zero rows instead, the last rank `edge_bottom`.
    """
    received = neighbour_rows(x, dim, top, bottom, rank, world, group_name)
    return _with_halo(x, received, dim, top, edge_top, edge_bottom, rank, world)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def halo_conv(
    x: torch.Tensor, received: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    dim: int, rows: int, rank: int, world: int,
) -> torch.Tensor:
    """A stride-1 convolution whose kernel reads `rows` rows either side (`padding[dim - 2] == rows`),
    over a band, without copying the band into a taller one.

    The band is convolved with the convolution's own zero padding: every output row is right except
    the first and last `rows`, which read zeros where the neighbours' rows belong (right at the global
    edges). Those are recomputed from `received` (`neighbour_rows(x, dim, rows, rows, ...)`) and the
    band's first / last `2 * rows` rows, and written over. Memory: the output and two strips, not a
    second copy of the band.
    """
    conv = _CONV[x.dim() - 2]
    n = x.shape[dim]
    strip = list(padding)
    strip[dim - 2] = 0
    if n < 2 * rows:  # a band thinner than the kernel's reach: convolve it with its halo attached
        return conv(_with_halo(x, received, dim, rows, rows, rows, rank, world), weight, bias, stride, strip,
                    dilation, groups)
    out = conv(x, weight, bias, stride, padding, dilation, groups)
    recv_up = rows if rank > 0 else 0
    if rank > 0:
        above = received[:recv_up].movedim(0, dim)
        fixed = conv(torch.cat([above, x.narrow(dim, 0, 2 * rows)], dim), weight, bias, stride, strip,
                     dilation, groups)
        out.narrow(dim, 0, rows).copy_(fixed)
    if rank < world - 1:
        below = received[recv_up:].movedim(0, dim)
        fixed = conv(torch.cat([x.narrow(dim, n - 2 * rows, 2 * rows), below], dim), weight, bias, stride,
                     strip, dilation, groups)
        out.narrow(dim, n - rows, rows).copy_(fixed)
    return out


def crop_rows(x: torch.Tensor, dim: int, rows: int, rank: int, world: int) -> torch.Tensor:
    """Drop the last `rows` rows of a band that a strided convolution must not read (not the last rank)."""
    if rows == 0 or rank == world - 1:
        return x
    return x.narrow(dim, 0, x.shape[dim] - rows)


def edge_pad(x: torch.Tensor, pad: Sequence[int], value: float | None, pad_index: int, rank: int, world: int) -> torch.Tensor:
    """`F.pad(x, pad, "constant", value)` with the height's pair (`pad[pad_index]`, `pad[pad_index+1]`)
    applied only at the global edges."""
    pad = list(pad)
    if rank > 0:
        pad[pad_index] = 0
    if rank < world - 1:
        pad[pad_index + 1] = 0
    return F.pad(x, pad, "constant", value)


def group_norm(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    group_name: str, world: int,
) -> torch.Tensor:
    """`F.group_norm` over a band: the statistics of the whole feature map (float32, Chan's merge)."""
    batch, channels = x.shape[0], x.shape[1]
    grouped = x.reshape(batch, num_groups, -1).float()
    count = grouped.shape[-1]
    var, mean = torch.var_mean(grouped, dim=-1, correction=0)  # [B, G] each
    stats = torch.stack([mean, var * count, torch.full_like(mean, count)], 0)  # [3, B, G]
    record_traced(group_name, stats, "group_norm all_gather")
    gathered = c10d.wait_tensor(c10d.all_gather_into_tensor(stats.contiguous(), world, group_name))
    gathered = gathered.reshape(world, 3, batch, num_groups)
    means, m2s, counts = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    total = counts.sum(0)
    global_mean = (means * counts).sum(0) / total
    global_var = (m2s + counts * (means - global_mean) ** 2).sum(0) / total
    # one fused pass with the global statistics (batch_norm in eval mode: (x - mean) / sqrt(var + eps)),
    # then the affine in place: few passes over the band and no temporaries of its size
    normed = F.batch_norm(grouped.reshape(1, batch * num_groups, count), global_mean.reshape(-1),
                          global_var.reshape(-1), None, None, False, 0.0, eps)
    shape = [1, channels] + [1] * (x.dim() - 2)
    out = normed.reshape(x.shape)  # a fresh tensor: the affine runs in place, no temporaries
    if weight is not None:
        out.mul_(weight.float().reshape(shape))
    if bias is not None:
        out.add_(bias.float().reshape(shape))
    return out.to(x.dtype)


def gather_rows_start(x: torch.Tensor, dim: int, units: Sequence[int], rank: int, world: int, group_name: str) -> torch.Tensor:
    """Issue the gather of every rank's band along `dim` (a row axis, or rows flattened with columns)."""
    per_unit = x.shape[dim] // units[rank]
    lengths = [per_unit * u for u in units]
    rows = x.movedim(dim, 0)
    local = rows.shape[0]
    send = rows.unsqueeze(0).expand(world, *rows.shape).reshape(world * local, *rows.shape[1:]).contiguous()
    record_traced(group_name, send, "row gather all_to_all")
    return c10d.all_to_all_single(send, lengths, [local] * world, group_name)


def gather_rows_wait(y: torch.Tensor, dim: int) -> torch.Tensor:
    return c10d.wait_tensor(y).movedim(0, dim)


SPATIAL_COLLECTIVES = (neighbour_rows, halo_exchange, group_norm, gather_rows_start)
