"""Spatial parallelism for convolutional graphs (the VAE): height bands, halos, exact statistics.

Before (one rank decodes the whole latent):

    h = conv2d(z, w, b, stride=1, padding=1)                 # [B, C, H, W]
    h = group_norm(h, 32, gamma, beta, eps)
    h = interpolate(h, scale_factor=2, mode="nearest")
    q, k, v = linear(flatten(h))...;  o = sdpa(q, k, v)      # attention over all H*W pixels
    h = conv2d(pad(h, (0, 1, 0, 1)), w2, b2, stride=2)       # encoder downsampling

After, on rank r of P (the executor hands it rows [b_r, b_{r+1}) of the input):

    h = halo_conv(z, neighbour_rows(z, 1, 1), w, b, stride=1, padding=1)  # edge rows redone with the halo
    h = spatial_ops.group_norm(h, 32, gamma, beta, eps)     # all-gathered (count, mean, M2): serial stats
    h = interpolate(h, scale_factor=2, mode="nearest")      # local: the band doubles with the rows
    k, v = gather_rows(k), gather_rows(v);  o = sdpa(q, k, v)  # queries stay local
    h = conv2d(halo_exchange(edge_pad(h), top=0, bottom=1), w2, b2, stride=2, padding=(0, 0))

Every feature map is held as contiguous row bands. A band's state (`Band`) is the dim carrying the
rows, its scale against the input, the explicit padding rank 0 holds above the data (from an `F.pad`
that the next convolution consumes) and, for maps whose rows were flattened with the columns
(attention's [B, H*W, C]), the positions per row. Bands are whole units of `align` input rows, where
`align` is the graph's total downsampling, so each strided convolution sees band edges on its stride
and no output row is computed twice or missed.

The rule table (one dispatch in `_Rewriter.visit`, on the op registry's kinds, passes/ops): pointwise ops and
same-shape ops carry the band, replicated operands must be broadcast along it; linear, permute,
transpose, (un)squeeze, chunk/split/getitem away from the rows, reshape/view/flatten where the rows
stay the outermost factor of their dim (proved on symbolic sizes); conv1d/2d/3d with the rows a
spatial dim: halo exchange (the rows the kernel reads across the band edge), zero padding only at
the global edges, bands aligned for strides ('same' stride-1 convolutions keep their padding and have
only their edge rows redone with the halo, `halo_conv`, so the band is never copied into a taller one); `F.pad` of the rows: at the global edges only; nearest
/ nearest-exact upsampling by an integer factor: local; group_norm: exact cross-rank statistics;
normalisations over other dims (RMS over channels): local; SDPA over flattened pixels: keys and
values gathered, queries local. Anything else that touches a band (a reduction or softmax along the
rows, bilinear resampling, a slice of the rows, a full-height tensor meeting a band, an op without a
rule) raises `Refusal`: the graph runs unrewritten with one warning, on every rank.

Preconditions: one non-parameter input of rank >= 4 (NCHW or NCTHW); its height symbolic
(`dynamic=True`). Postconditions: `gm.meta["npu_dit.spatial"]` holds the `SpatialPlan`; every
node's `meta["val"]` is the value on this rank (for the example input's bands).
Pipeline position: after scalar_inputs; the only sharding pass of a spatial graph.
"""

from __future__ import annotations

import dataclasses
import os
import math
from fractions import Fraction
from typing import Any

import sympy
import torch
import torch.fx as fx

from npu_dit.passes.analysis.attention_ops import is_sdpa, node_value
from npu_dit.passes.ops import semantics
from npu_dit.passes.analysis.module_paths import module_path
from npu_dit.passes.analysis.symbolic import exprs_equal, size_expr
from npu_dit.passes.infra import PassResult, Refusal
from npu_dit.plans import SPATIAL_META_KEY, SpatialPlan
from npu_dit.runtime import spatial_ops as S
from npu_dit.runtime.dist import ParallelContext


@dataclasses.dataclass(frozen=True)
class Band:
    dim: int
    scale: Fraction  # rows of this map per input row
    pending_top: int = 0  # explicit padding rows above the data on rank 0 (until a conv consumes them)
    inner: Any = sympy.Integer(1)  # positions per row when the rows are flattened with the columns

    def moved(self, dim: int) -> "Band":
        return dataclasses.replace(self, dim=dim)


_NEAREST = {"nearest", "nearest-exact"}
_GROUP_NORMS = {torch.nn.functional.group_norm, torch.group_norm}
# norms over dims the rows are not in stay local (layer / RMS norms over the channels)
_ROW_LOCAL_NORMS = {torch.nn.functional.layer_norm, torch.layer_norm, torch.nn.functional.rms_norm, torch.rms_norm,
                    torch.nn.functional.normalize}
_SQUEEZES = {torch.squeeze, torch.Tensor.squeeze, torch.unsqueeze, torch.Tensor.unsqueeze}
_UNSQUEEZES = {torch.unsqueeze, torch.Tensor.unsqueeze}


def _name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", str(target))
    if hasattr(target, "overloadpacket"):
        name = target.overloadpacket.__name__
    return name




def _simplify(expr: sympy.Expr) -> sympy.Expr:
    """A ratio of products of sizes in lowest terms (`cancel`, canonical for rational functions);
    `simplify` only for floor divisions and the like."""
    return sympy.cancel(expr) if expr.is_rational_function() else sympy.simplify(expr)


def _prod(values: list[sympy.Expr]) -> sympy.Expr:
    return sympy.Mul(*values) if values else sympy.Integer(1)


def _shape(node: Any) -> list[sympy.Expr] | None:
    value = node_value(node)
    if isinstance(value, torch.Tensor):
        return [size_expr(s) for s in value.shape]
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `name` of the call, read through its schema (`index` is where the schema puts it)."""
    sem = semantics(node)
    if sem is not None and name in sem.call.args:
        value = sem.call.args[name]
        return default if value is None else value
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _tuple(value: Any, n: int) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value) if len(value) == n else tuple(value) * n
    return (value,) * n


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, ctx: ParallelContext, input_index: int, dim: int) -> None:
        self.gm, self.graph, self.ctx = gm, gm.graph, ctx
        self.world, self.rank = ctx.world_size, ctx.rank
        self.input_index, self.dim = input_index, dim
        self.bands: dict[fx.Node, Any] = {}  # node -> Band | list[Band | None] (tuple outputs) | None
        self.counts: dict[str, int] = {}
        self.sites: list[str] = []  # one line per rewritten op, for inspect
        self.halos: list[tuple[int, Fraction]] = []  # (rows a neighbour must hold, scale) per halo
        self.strides: list[Fraction] = []  # scales of the maps strided convolutions read
        self.units_nodes: list[fx.Node] = []
        self.outputs: list[tuple[int, int]] = []

    # ---- helpers -------------------------------------------------------------------------------
    def refuse(self, node: fx.Node, why: str) -> None:
        where = module_path(node) or node.name
        raise Refusal(f"spatial sharding has no exact rule for {_name(node)} at {where}: {why}")

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def call_before(self, node: fx.Node, fn: Any, args: tuple) -> fx.Node:
        with self.graph.inserting_before(node):
            new = self.graph.call_function(fn, args)
        new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        return new

    def sharded_inputs(self, node: fx.Node) -> list[tuple[fx.Node, Band]]:
        found = []
        for a in node.all_input_nodes:
            band = self.bands.get(a)
            if isinstance(band, Band):
                found.append((a, band))
            elif isinstance(band, list) and any(b is not None for b in band):
                if getattr(semantics(node), "kind", None) != "getitem":
                    self.refuse(node, "a tuple of bands used whole")
        return found

    # ---- the walk ------------------------------------------------------------------------------
    def run(self) -> None:
        # what each node was called with: the refresh substitutes the nodes whose arguments are the
        # same objects (or nodes whose new values are their old ones with the band's rows put in)
        self.original_args = {n: (n.args, n.kwargs) for n in self.graph.nodes}
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.bands[placeholders[self.input_index]] = Band(self.dim, Fraction(1))
        last = placeholders[-1]
        for j in range(self.world):
            with self.graph.inserting_after(last):
                last = self.graph.placeholder(f"spatial_units_{j}")
            last.meta["val"] = 1
            self.units_nodes.append(last)
        for node in list(self.graph.nodes):
            if node.op in ("placeholder", "get_attr") or node in self.units_nodes:
                continue
            if node.op == "output":
                self.visit_output(node)
                continue
            self.visit(node)

    def visit_output(self, node: fx.Node) -> None:
        values = node.args[0]
        flat = list(values) if isinstance(values, (list, tuple)) else [values]
        for i, value in enumerate(flat):
            band = self.bands.get(value) if isinstance(value, fx.Node) else None
            if band is None:
                continue
            if not isinstance(band, Band) or band.pending_top or not exprs_equal(band.inner, sympy.Integer(1), simplify=True):
                self.refuse(node, f"output {i} is not a plain band of rows")
            self.outputs.append((i, band.dim))

    def visit(self, node: fx.Node) -> None:
        sem = semantics(node)
        kind = sem.kind if sem is not None else None
        if kind == "getitem" and isinstance(self.bands.get(node.args[0]), list):
            return self.visit_getitem(node)
        sharded = self.sharded_inputs(node)
        if not sharded:
            self.bands[node] = None
            return
        if sem is None:
            self.refuse(node, "no rule for this op on a band of rows")
        if sem.mutates:
            self.refuse(node, "writes in place into a band of rows")
        value = node_value(node)
        x = sem.call.args.get("input")
        if kind == "size":
            self.bands[node] = None  # the local size: what the graph's arithmetic should see
            return
        if kind == "getitem":
            return self.visit_getitem(node)
        if kind == "conv":
            return self.visit_conv(node, sharded, len(_shape(node)) - 2)
        if kind == "pad":
            return self.visit_pad(node, sharded)
        if kind == "resample":
            return self.visit_interpolate(node, sharded)
        if sem.call.target in _GROUP_NORMS:
            return self.visit_group_norm(node, sharded)
        if kind == "mix" and sem.call.target in _ROW_LOCAL_NORMS:
            return self.visit_other_norm(node, sharded, sem)
        if kind == "attention" and is_sdpa(node):
            return self.visit_attention(node)
        if kind == "reshape" and sem.call.target not in _SQUEEZES:
            return self.visit_reshape(node, sharded)
        if kind == "permute" or sem.call.target in _SQUEEZES:
            return self.visit_layout(node, sharded, sem)
        if kind in ("split", "unbind"):
            return self.visit_split(node, sharded, sem)
        if kind == "cat":
            return self.visit_cat(node, sharded, sem)
        if kind == "linear":
            band = sharded[0][1]
            if x is not sharded[0][0] or len(sharded) > 1 or band.dim == len(_shape(x)) - 1:
                self.refuse(node, "the rows are contracted")
            self.bands[node] = band
            return
        if kind == "same":  # a second operand (type_as, to) only gives the dtype (and device)
            if x not in dict(sharded):
                self.refuse(node, "casts a full tensor like a band")
            self.bands[node] = self.bands[x]
            return
        if isinstance(value, torch.Tensor) and kind == "pointwise":
            return self.visit_pointwise(node, sharded)
        self.refuse(node, "no rule for this op on a band of rows")

    # ---- rules ---------------------------------------------------------------------------------
    def visit_pointwise(self, node: fx.Node, sharded: list[tuple[fx.Node, Band]]) -> None:
        out = _shape(node)
        bands = set()
        for arg, band in sharded:
            bands.add(dataclasses.replace(band, dim=len(out) - len(_shape(arg)) + band.dim))
        if len(bands) != 1:
            self.refuse(node, "operands hold their rows differently")
        band = bands.pop()
        for arg in node.all_input_nodes:
            if arg in dict(sharded):
                continue
            shape = _shape(arg)
            if shape is None:
                continue
            d = len(shape) - len(out) + band.dim
            if d >= 0 and shape[d] != 1:
                self.refuse(node, f"a full-height tensor ({arg.name}) meets a band of rows")
        self.bands[node] = band

    def visit_getitem(self, node: fx.Node) -> None:
        source, index = node.args[0], node.args[1]
        band = self.bands.get(source)
        if isinstance(band, list):
            self.bands[node] = band[index] if isinstance(index, int) else self.refuse(node, "slice of a tuple")
            return
        assert isinstance(band, Band)
        items = index if isinstance(index, tuple) else (index,)
        dim, out_dim, new_dim = 0, 0, None
        for item in items:
            if item is None:
                out_dim += 1
                continue
            if item is Ellipsis or isinstance(item, fx.Node):
                self.refuse(node, "an indexing form the rules do not cover")
            if dim == band.dim:
                if not (isinstance(item, slice) and item == slice(None, None, None)):
                    self.refuse(node, "a slice or index of the rows")
                new_dim = out_dim
            if isinstance(item, int):
                dim += 1
                continue
            dim += 1
            out_dim += 1
        if new_dim is None:
            new_dim = out_dim + (band.dim - dim)
        self.bands[node] = band.moved(new_dim)

    def visit_layout(self, node: fx.Node, sharded: list, sem: Any) -> None:
        band = sharded[0][1]
        x = sem.call.args["input"]
        ndim = len(_shape(x))
        out_ndim = len(_shape(node))
        if sem.kind == "permute":
            new = list(sem.dims).index(band.dim)
        elif sem.call.target in _UNSQUEEZES:
            d = int(sem.call.args["dim"]) % out_ndim
            new = band.dim + 1 if d <= band.dim else band.dim
        else:  # squeeze: the rows are never a size-1 dim (the height is symbolic), so they stay
            in_shape = _shape(x)
            dims = sem.call.args.get("dim")
            if dims is None:
                removed = {d for d, size in enumerate(in_shape) if size == 1}
            else:
                dims = dims if isinstance(dims, (list, tuple)) else [dims]
                removed = {d % ndim for d in dims if in_shape[d % ndim] == 1}
            if band.dim in removed:
                self.refuse(node, "squeezes the rows")
            new = band.dim - sum(1 for d in removed if d < band.dim)
        self.bands[node] = band.moved(new)

    def visit_split(self, node: fx.Node, sharded: list, sem: Any) -> None:
        band = sharded[0][1]
        dim = sem.dim
        if dim == band.dim:
            self.refuse(node, "splits the rows")
        value = node_value(node)
        count = len(value) if isinstance(value, (list, tuple)) else 1
        if sem.kind == "unbind":
            new = band.dim - 1 if dim < band.dim else band.dim
            self.bands[node] = [band.moved(new)] * count
        else:
            self.bands[node] = [band] * count

    def visit_cat(self, node: fx.Node, sharded: list, sem: Any) -> None:
        tensors = sem.call.args["tensors"]
        dim = sem.dim
        bands = {self.bands.get(t) for t in tensors}
        if len(bands) != 1 or None in bands:
            self.refuse(node, "concatenates a band with a full tensor or a differently held band")
        band = bands.pop()
        if int(dim) % len(_shape(node)) == band.dim:
            self.refuse(node, "concatenates along the rows")
        self.bands[node] = band

    def visit_reshape(self, node: fx.Node, sharded: list) -> None:
        band = sharded[0][1]
        src, out = _shape(node.args[0]), _shape(node)
        pre = _prod(src[:band.dim])
        j = next((j for j in range(len(out) + 1) if exprs_equal(_prod(out[:j]), pre, simplify=True)), None)
        # size-1 dims before the rows do not matter: take the last j with the same prefix
        while j is not None and j + 1 < len(out) and out[j] == 1:
            j += 1
        if j is None or j >= len(out):
            self.refuse(node, "the rows do not stay the outer factor of a dim")
        size = src[band.dim]
        rows = _simplify(size / band.inner)
        if exprs_equal(out[j], size, simplify=True):
            self.bands[node] = band.moved(j)
            return
        for k in range(band.dim + 2, len(src) + 1):  # merge: rows x inner x following dims
            if exprs_equal(out[j], size * _prod(src[band.dim + 1:k]), simplify=True):
                self.bands[node] = dataclasses.replace(band, dim=j, inner=_simplify(band.inner * _prod(src[band.dim + 1:k])))
                self._check_plain_pending(node, band)
                return
        for k in range(j + 2, len(out) + 1):  # split: rows x (inner / following dims)
            rest = _prod(out[j + 1:k])
            if exprs_equal(_prod(out[j:k]), size, simplify=True):
                inner = _simplify(band.inner / rest)
                if exprs_equal(out[j], rows * inner, simplify=True) and inner.is_polynomial() and sympy.fraction(sympy.together(inner))[1] == 1:
                    self.bands[node] = dataclasses.replace(band, dim=j, inner=inner)
                    self._check_plain_pending(node, band)
                    return
        self.refuse(node, "the rows do not stay the outer factor of a dim")

    def _check_plain_pending(self, node: fx.Node, band: Band) -> None:
        if band.pending_top:
            self.refuse(node, "reshapes a band that still holds edge padding")

    def visit_pad(self, node: fx.Node, sharded: list) -> None:
        band = sharded[0][1]
        if node.args[0] is not sharded[0][0]:
            self.refuse(node, "pads with a band as the value")
        pad = list(_arg(node, 1, "pad"))
        mode = _arg(node, 2, "mode", "constant")
        value = _arg(node, 3, "value", None)
        ndim = len(_shape(node.args[0]))
        index = 2 * (ndim - 1 - band.dim)
        if index + 1 >= len(pad) or (pad[index] == 0 and pad[index + 1] == 0):
            self.bands[node] = band
            return
        if mode != "constant" or any(isinstance(p, fx.Node) for p in pad):
            self.refuse(node, f"{mode} padding of the rows")
        if band.inner != 1:
            self.refuse(node, "pads flattened rows")
        new = self.call_before(node, S.edge_pad, (node.args[0], pad, value, index, self.rank, self.world))
        new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self.bands[new] = dataclasses.replace(band, pending_top=band.pending_top + int(pad[index]))
        self.count("edge_pad")

    def visit_conv(self, node: fx.Node, sharded: list, spatial: int) -> None:
        x, band = sharded[0]
        if node.args[0] is not x or len(sharded) > 1:
            self.refuse(node, "a band as the weight")
        in_shape = _shape(x)
        if len(in_shape) != spatial + 2 or band.dim < 2 or band.inner != 1:
            self.refuse(node, "the rows are not a spatial dim of a batched convolution")
        k = band.dim - 2
        weight = _shape(node.args[1])
        kernel = weight[2 + k]
        stride = _tuple(_arg(node, 3, "stride", 1), spatial)
        padding = _arg(node, 4, "padding", 0)
        dilation = _tuple(_arg(node, 5, "dilation", 1), spatial)
        if isinstance(padding, str) or not kernel.is_Integer:
            self.refuse(node, f"padding={padding!r} / kernel {kernel}")
        padding = list(_tuple(padding, spatial))
        s, p, kernel_rows = int(stride[k]), int(padding[k]), (int(kernel) - 1) * int(dilation[k]) + 1
        if kernel_rows == 1 and s == 1 and p == 0:
            self.bands[node] = band  # pointwise along the rows
            return
        if band.pending_top % s:
            self.refuse(node, "explicit padding not on the stride")
        top = band.pending_top + p
        bottom = kernel_rows - s - top
        self.halos.append((max(top, bottom, 0), band.scale))
        if s > 1:
            self.strides.append(band.scale / s)
        if s == 1 and top == bottom == p > 0 and not band.pending_top:
            self.replace_with_halo_conv(node, x, band, spatial, p, int(kernel))
            return
        with self.graph.inserting_before(node):
            xin = x
            if bottom < 0:
                xin = self.graph.call_function(S.crop_rows, (xin, band.dim, -bottom, self.rank, self.world))
            if top or bottom > 0 or p:
                xin = self.graph.call_function(
                    S.halo_exchange,
                    (xin, band.dim, top, max(bottom, 0), p, p, self.rank, self.world, self.ctx.group_name),
                )
                self.count("halo_exchange")
        for n in (xin,) if xin is not x else ():
            n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        padding[k] = 0
        args = list(node.args)
        args[0] = xin
        kwargs = dict(node.kwargs)
        if len(args) > 4:
            args[4] = tuple(padding)
        else:
            kwargs["padding"] = tuple(padding)
        node.args, node.kwargs = tuple(args), kwargs
        self.bands[node] = Band(band.dim, band.scale / s)
        self.sites.append(
            f"{module_path(node) or node.name}: conv k={int(kernel)} s={s} p={p} -> halo {top} row(s) above, "
            f"{max(bottom, 0)} below; padding only at the global edges"
        )
        self.count("conv")

    def replace_with_halo_conv(
        self, node: fx.Node, x: fx.Node, band: Band, spatial: int, rows: int, kernel: int,
    ) -> None:
        """The common 'same' convolution (stride 1, `rows` rows of padding either side, read by the kernel):
        the band is convolved as it is and only its edge rows are redone with the neighbours' rows
        (`spatial_ops.halo_conv`), so no taller copy of the band is made."""
        received = self.call_before(node, S.neighbour_rows,
                                    (x, band.dim, rows, rows, self.rank, self.world, self.ctx.group_name))
        self.count("halo_exchange")
        conv_args = (
            x, received, node.args[1], _arg(node, 2, "bias"), _tuple(_arg(node, 3, "stride", 1), spatial),
            _tuple(_arg(node, 4, "padding", 0), spatial), _tuple(_arg(node, 5, "dilation", 1), spatial),
            _arg(node, 6, "groups", 1), band.dim, rows, self.rank, self.world,
        )
        new = self.call_before(node, S.halo_conv, conv_args)
        new.meta.update({k: v for k, v in node.meta.items() if k != "nn_module_stack"})
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self.bands[new] = Band(band.dim, band.scale)
        self.sites.append(
            f"{module_path(new) or new.name}: conv k={kernel} s=1 p={rows} -> halo {rows} row(s) above, "
            f"{rows} below; the band convolved in place, its edge rows redone with the halo"
        )
        self.count("conv")

    def visit_interpolate(self, node: fx.Node, sharded: list) -> None:
        band = sharded[0][1]
        mode = _arg(node, 3, "mode", "nearest")
        size = _arg(node, 1, "size", None)
        scale = _arg(node, 2, "scale_factor", None)
        if mode not in _NEAREST or size is not None or scale is None or band.pending_top or band.inner != 1:
            self.refuse(node, f"mode={mode!r}, size={size!r}: only nearest upsampling by a scale factor is local")
        factors = _tuple(scale, len(_shape(node)) - 2)
        factor = factors[band.dim - 2]
        if float(factor) != int(factor) or int(factor) < 1:
            self.refuse(node, f"scale factor {factor} along the rows is not a whole number")
        self.bands[node] = Band(band.dim, band.scale * int(factor))
        self.count("upsample")

    def visit_group_norm(self, node: fx.Node, sharded: list) -> None:
        x, band = sharded[0]
        if node.args[0] is not x or len(sharded) > 1 or band.dim < 2 or band.pending_top:
            self.refuse(node, "group norm of a band with edge padding, or of channels")
        groups = _arg(node, 1, "num_groups")
        weight, bias, eps = _arg(node, 2, "weight"), _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5)
        new = self.call_before(node, S.group_norm, (x, groups, weight, bias, eps, self.ctx.group_name, self.world))
        new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self.bands[new] = band
        self.sites.append(f"{module_path(new) or new.name}: group_norm({groups} groups) -> all-gather of "
                          f"per-group count, mean, M2 (float32)")
        self.count("group_norm")

    def visit_other_norm(self, node: fx.Node, sharded: list, sem: Any) -> None:
        band = sharded[0][1]
        if sem.call.args["input"] is not sharded[0][0] or len(sharded) > 1 or band.dim in sem.dims:
            self.refuse(node, "normalises over the rows")
        self.bands[node] = band

    def visit_attention(self, node: fx.Node) -> None:
        from npu_dit.passes.analysis.attention_ops import sdpa_args

        args = sdpa_args(node)
        q, k, v, mask = args["query"], args["key"], args["value"], args.get("attn_mask")
        bands = [self.bands.get(t) for t in (q, k, v)]
        ndim = len(_shape(q))
        if mask is not None or args.get("is_causal") or any(
            not isinstance(b, Band) or b.dim != ndim - 2 or b.pending_top for b in bands
        ):
            self.refuse(node, "attention whose queries, keys and values are not all sharded along the pixels")
        gathered = []
        for t, band in ((k, bands[1]), (v, bands[2])):
            start = self.call_before(node, S.gather_rows_start,
                                     (t, band.dim, list(self.units_nodes), self.rank, self.world, self.ctx.group_name))
            wait = self.call_before(node, S.gather_rows_wait, (start, band.dim))
            gathered.append(wait)
            self.count("gather_rows")
        # by position, not by value: q, k and v may be one node (self-attention on one tensor)
        call = list(node.args)
        kwargs = dict(node.kwargs)
        for position, name, new in ((1, "key", gathered[0]), (2, "value", gathered[1])):
            if len(call) > position:
                call[position] = new
            else:
                kwargs[name] = new
        node.args, node.kwargs = tuple(call), kwargs
        self.bands[node] = bands[0]
        self.sites.append(f"{module_path(node) or node.name}: attention over pixels -> keys and values gathered "
                          f"along the rows, queries local")


def _sharded_input(gm: fx.GraphModule) -> tuple[int, int, fx.Node]:
    candidates = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        value = node_value(node)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and value.dim() >= 4:
            candidates.append((i, node, value))
    if len(candidates) != 1:
        names = [n.meta.get("npu_dit.input_name", n.name) for _, n, _ in candidates]
        raise Refusal(f"spatial sharding needs exactly one image/latent input of rank >= 4, found {names or 'none'}")
    index, node, value = candidates[0]
    dim = value.dim() - 2  # NCHW / NCTHW: the height
    if not isinstance(value.shape[dim], torch.SymInt):
        raise Refusal(
            f"the height of {node.meta.get('npu_dit.input_name', node.name)} is static in this graph",
            fix="compile with dynamic=True (torch.compile(vae.decode, backend='npu_dit', dynamic=True, ...))",
        )
    return index, dim, node


def _align(strides: list[Fraction]) -> int:
    """Input rows per band unit: every strided conv's input scale times the unit is a whole multiple of
    its stride (the lcm of the denominators of the scales the strided convs produce)."""
    align = 1
    for scale in strides:
        align = math.lcm(align, scale.denominator)
    return align


def spatial_pass(gm: fx.GraphModule, *, ctx: ParallelContext) -> PassResult:
    index, dim, input_node = _sharded_input(gm)
    rewriter = _Rewriter(gm, ctx, index, dim)
    rewriter.run()
    if not rewriter.counts.get("conv"):
        raise Refusal("spatial sharding found no convolution over the rows of the input")
    align = _align(rewriter.strides)
    # a halo of h rows at scale q needs every band to hold h rows there: units * align * q >= h
    min_units = max([1] + [math.ceil(Fraction(h) / (align * q)) for h, q in rewriter.halos if h])
    height = input_node.meta["val"].shape[dim]
    local_symints = [
        i for i, n in enumerate(p for p in gm.graph.nodes if p.op == "placeholder")
        if isinstance(node_value(n), torch.SymInt) and exprs_equal(size_expr(node_value(n)), size_expr(height), simplify=True)
    ]
    plan = SpatialPlan(
        world_size=ctx.world_size, rank=ctx.rank, input_index=index, dim=dim, align=align, min_units=min_units,
        local_symints=local_symints, outputs=rewriter.outputs,
        input_name=str(input_node.meta.get("npu_dit.input_name", input_node.name)),
    )
    gm.meta[SPATIAL_META_KEY] = plan
    gm.graph.lint()
    gm.recompile()
    refresh_local_shapes(gm, plan, rewriter)
    return PassResult(gm, modified=True, counts=rewriter.counts, notes=plan.describe() + rewriter.sites)


def refresh_local_shapes(gm: fx.GraphModule, plan: SpatialPlan, rewriter: _Rewriter | None = None) -> None:
    """meta["val"] of every node becomes this rank's value for the example input's bands: the height
    symbol gets the band's rows (a fresh symbol whose hint is this rank's row count), the unit inputs
    their example values. A node of the captured graph whose inputs have their old values with the rows
    put in (every input, checked) gets its old value with the rows put in; the band helpers get theirs
    by shape rules; the rest (inserted calls, nodes fed by them) runs on fake values."""
    from npu_dit.passes.analysis.fake_prop import (Rewired, SymbolMap, copied_placeholder_values, refresh,
                                                   repropagate, swapped_inputs)

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    source = node_value(placeholders[plan.input_index])
    height = source.shape[plan.dim]
    hint = int(height.node.hint) if isinstance(height, torch.SymInt) and height.node.hint is not None else 8 * plan.align
    units = S.band_units(hint, plan.align, plan.world_size)
    if hint % plan.align or min(units) < plan.min_units:  # the example would run unrewritten anyway
        units = [plan.min_units] * plan.world_size
    symbols = SymbolMap()
    unit_syms = [symbols.env.create_symintnode(symbols.new_symbol(f"units_{j}", max(u, 2)), hint=max(u, 2))
                 for j, u in enumerate(units)]
    rows = unit_syms[plan.rank] * plan.align
    if isinstance(height, torch.SymInt):
        symbols.bind(height.node.expr, rows.node.expr)
    first_unit = len(placeholders) - plan.world_size

    def override(i: int, node: fx.Node) -> Any:
        if i >= first_unit:
            return unit_syms[i - first_unit]
        return None

    if rewriter is None or os.environ.get("NPU_DIT_FULL_REFRESH") == "1":
        repropagate(gm, copied_placeholder_values(gm, symbols, override))
        return
    old_values = {n: n.meta.get("val") for n in rewriter.original_args}
    rows_in: dict = {}  # the one mapping: the height's symbol is bound in `symbols` itself

    def rename(node: fx.Node) -> Rewired | None:
        original = rewriter.original_args.get(node)
        if original is None:
            return None  # inserted: its shape rule, or run
        swapped = swapped_inputs(original, (node.args, node.kwargs))
        if swapped is None:
            return None
        # unlike the token rewrite, no analysis says which nodes hold the band: every input is checked
        swapped_in = {new for new, _ in swapped}
        inputs = [(new, old_values.get(old)) for new, old in swapped]
        inputs += [(n, old_values.get(n)) for n in node.all_input_nodes if n not in swapped_in]
        return Rewired(rows_in, inputs)

    from npu_dit.passes.collective_meta import SPATIAL_RULES

    refresh(gm, copied_placeholder_values(gm, symbols, override), symbols, rename, SPATIAL_RULES)
