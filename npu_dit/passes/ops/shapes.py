"""Output shapes by rule: padding and nearest upsampling, without a fake dispatch.

A rewriting pass's refresh (`fake_prop.refresh`) gives a node its value by substitution when its
inputs kept their values; a node whose inputs changed (or one the pass inserted) is run on fake
values, a dispatch that costs milliseconds with symbolic sizes (nearest upsampling's decomposition
builds index tensors: ~0.2 s per call on a full-size VAE's maps). These ops' output shapes are
simple functions of their arguments, so the refresh takes them from here instead:

    F.pad(x, pad)                                  size[d] + pad[2i] + pad[2i+1], d = ndim - 1 - i
    F.interpolate(x, scale_factor=f, mode=nearest) size[d] * f  (f a whole number)
    F.interpolate(x, size=s, mode=nearest)         s

Each rule takes the call's arguments as the op does (Python binds them by the op's own signature)
and returns (sizes, dtype, device) of a contiguous output. A call a rule does not cover raises
`NotCovered` and is run instead: a channels-last input (the kernel keeps its memory format), a
fractional scale factor (the kernel floors a float product), `recompute_scale_factor`, antialiasing,
any mode but nearest / nearest-exact. tests/test_spatial_shapes.py checks every rule against the
fake kernels (with PyTorch's Python dispatcher, as under Dynamo) and against real runs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format


class NotCovered(Exception):
    """A call outside what the rule proves: run it on fake values instead."""


def padded_sizes(shape: Sequence[Any], pad: Sequence[Any]) -> list[Any]:
    """The shape `F.pad(x, pad)` gives `x` of `shape` (any mode: the pairs count from the last dim)."""
    if len(pad) % 2 or len(pad) // 2 > len(shape):
        raise NotCovered(f"pad {list(pad)} for {len(shape)} dims")
    sizes = list(shape)
    for i in range(len(pad) // 2):
        sizes[len(shape) - 1 - i] = sizes[len(shape) - 1 - i] + pad[2 * i] + pad[2 * i + 1]
    return sizes


def _contiguous(x: torch.Tensor) -> None:
    """Both kernels make their output in the input's suggested memory format (`constant_pad_nd`'s
    and `_upsample_nearest`'s decompositions, and the C++ kernels): contiguous unless the input's
    strides look channels-last."""
    if not isinstance(x, torch.Tensor) or (not x.is_contiguous()
                                           and suggest_memory_format(x) != torch.contiguous_format):
        raise NotCovered("a channels-last input keeps its memory format")


def _padded(input: torch.Tensor, pad: Sequence[Any]) -> tuple:
    _contiguous(input)
    if not input.is_contiguous() and not any(isinstance(p, int) and p > 0 for p in pad):
        # no row or column added: the kernel returns a clone of the (cropped) input, in its layout
        raise NotCovered(f"pad {list(pad)} adds nothing to an input that is not contiguous")
    return padded_sizes(input.shape, pad), input.dtype, input.device


def pad(input: torch.Tensor, pad: Sequence[Any], mode: str = "constant", value: float | None = None) -> tuple:
    return _padded(input, pad)


def constant_pad_nd(input: torch.Tensor, pad: Sequence[Any], value: float = 0) -> tuple:
    return _padded(input, pad)


_NEAREST = {"nearest", "nearest-exact"}


def interpolate(input: torch.Tensor, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
                align_corners: bool | None = None, recompute_scale_factor: bool | None = None,
                antialias: bool = False) -> tuple:
    _contiguous(input)
    if mode not in _NEAREST or recompute_scale_factor or antialias:
        raise NotCovered(f"mode={mode!r}, recompute_scale_factor={recompute_scale_factor}, antialias={antialias}")
    spatial = input.dim() - 2
    if spatial < 1 or (size is None) == (scale_factor is None):
        raise NotCovered("exactly one of size and scale_factor, on a batched map")
    if size is not None:
        sizes = list(size) if isinstance(size, (list, tuple)) else [size] * spatial
    else:
        factors = list(scale_factor) if isinstance(scale_factor, (list, tuple)) else [scale_factor] * spatial
        if any(not isinstance(f, (int, float)) or float(f) != int(f) or int(f) < 1 for f in factors):
            raise NotCovered(f"scale factors {factors}: only whole numbers multiply a symbolic size exactly")
        sizes = [s * int(f) for s, f in zip(input.shape[2:], factors)]
    if len(sizes) != spatial:
        raise NotCovered(f"{len(sizes)} output sizes for {spatial} spatial dims")
    return [*input.shape[:2], *sizes], input.dtype, input.device


SHAPE_RULES: dict[Any, Any] = {
    F.pad: pad, torch._C._nn.pad: pad, torch.constant_pad_nd: constant_pad_nd,
    torch.ops.aten.constant_pad_nd.default: constant_pad_nd,
    F.interpolate: interpolate,
}
