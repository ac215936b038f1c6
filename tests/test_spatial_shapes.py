"""Issue #19: the shape rules for padding and nearest upsampling (`passes/ops/shapes.py`) against the
ops themselves: the real kernel on real tensors, and the fake kernel on symbolic sizes in a fresh
ShapeEnv (with PyTorch's Python dispatcher, as the refresh and the strict check run it: without it the
fake kernels fix every symbol to its example value). A call a rule does not cover says so."""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from npu_dit.passes.analysis.fake_prop import SymbolMap, symbolic_dispatch
from npu_dit.passes.collective_meta import SPATIAL_RULES
from npu_dit.passes.ops.shapes import SHAPE_RULES, NotCovered
from npu_dit.runtime import spatial_ops as S


def _symbolic(shape: list[int]) -> tuple[SymbolMap, torch.Tensor, list]:
    """A fake tensor of `shape` whose dims after the first two are fresh symbols (hints: `shape`)."""
    symbols = SymbolMap()
    sizes = [s if d < 2 else symbols.env.create_symintnode(symbols.new_symbol(f"d{d}", s), hint=s)
             for d, s in enumerate(shape)]
    with symbols.mode:
        x = torch.empty(sizes)
    return symbols, x, sizes


def _exprs(sizes) -> list[sympy.Expr]:
    return [sympy.expand(s.node.expr) if isinstance(s, torch.SymInt) else sympy.Integer(int(s)) for s in sizes]


def _check(target, rule, make_args, shape, order=None):
    """The rule's sizes equal the real output's for the real tensor and, as expressions, the fake
    kernel's on symbolic sizes (no symbol fixed to its example value on the way); `order` permutes
    the input first (a transposed map, not channels-last: the output is still contiguous)."""
    layout = (lambda x: x.transpose(-1, -2)) if order == "transposed" else (lambda x: x)
    real_args, real_kwargs = make_args(layout(torch.randn(shape)))
    real = target(*real_args, **real_kwargs)
    try:
        sizes, dtype, _ = rule(*real_args, **real_kwargs)
    except NotCovered:  # the refresh runs such a call: right by construction
        assert order is not None, "a contiguous input is always covered"
        return
    assert [int(s) for s in sizes] == list(real.shape) and dtype == real.dtype and real.is_contiguous()
    symbols, x, _ = _symbolic(shape)
    args, kwargs = make_args(layout(x))
    with symbols.mode, symbols.env.suppress_guards(), symbolic_dispatch():
        fake = target(*args, **kwargs)
        sizes, _, _ = rule(*args, **kwargs)
    assert _exprs(sizes) == _exprs(fake.shape)
    assert fake.is_contiguous()  # the refresh builds a contiguous value from the rule
    assert not [v for v in symbols.env.replacements.values() if v.is_number], symbols.env.replacements


pads = st.lists(st.integers(-1, 3), min_size=2, max_size=6).filter(lambda p: len(p) % 2 == 0)


@settings(max_examples=25, deadline=None)
@given(pad=pads, rows=st.integers(4, 9), cols=st.integers(4, 7), target=st.sampled_from([F.pad, torch.constant_pad_nd]),
       order=st.sampled_from([None, "transposed"]))
def test_pad_rule_equals_the_kernel(pad, rows, cols, target, order):
    _check(target, SHAPE_RULES[target], lambda x: ((x, pad), {}), [1, 2, 3, rows, cols], order)


@settings(max_examples=20, deadline=None)
@given(factors=st.lists(st.integers(1, 3), min_size=2, max_size=3), mode=st.sampled_from(["nearest", "nearest-exact"]),
       by_size=st.booleans(), rows=st.integers(2, 6), order=st.sampled_from([None, "transposed"]))
def test_nearest_rule_equals_the_kernel(factors, mode, by_size, rows, order):
    shape = [1, 2, *[rows + i for i in range(len(factors))]]

    def make_args(x):
        if by_size:  # an explicit output size (the graph's own arithmetic on the input's sizes)
            return (x,), {"size": [s * f for s, f in zip(x.shape[2:], factors)], "mode": mode}
        return (x,), {"scale_factor": tuple(float(f) for f in factors), "mode": mode}

    _check(F.interpolate, SHAPE_RULES[F.interpolate], make_args, shape, order)


@pytest.mark.parametrize("rank,world", [(0, 3), (1, 3), (2, 3), (0, 1)])
def test_edge_pad_rule_equals_the_helper(rank, world):
    pad, index = [1, 1, 2, 1, 2, 0], 2  # Qwen-Image's causal conv: the rows' pair is (2, 1) here
    _check(S.edge_pad, SPATIAL_RULES[S.edge_pad], lambda x: ((x, pad, None, index, rank, world), {}), [1, 2, 3, 6, 5])


@pytest.mark.parametrize("call", [
    lambda x: SHAPE_RULES[F.interpolate](x, scale_factor=1.5, mode="nearest"),  # the kernel floors a float product
    lambda x: SHAPE_RULES[F.interpolate](x, scale_factor=2.0, mode="bilinear"),
    lambda x: SHAPE_RULES[F.interpolate](x, scale_factor=2.0, mode="nearest", recompute_scale_factor=True),
    lambda x: SHAPE_RULES[F.pad](x.contiguous(memory_format=torch.channels_last), [1, 1]),  # channels-last: the kernel keeps the layout
    lambda x: SHAPE_RULES[F.pad](x, [1, 1, 1]),
])
def test_calls_the_rules_do_not_cover_are_run(call):
    with pytest.raises(NotCovered):
        call(torch.randn(1, 2, 4, 4))
