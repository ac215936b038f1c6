"""The inner compilers' dynamic-shape table (`runtime/inner.py`): one compile while its guards hold."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from npu_dit.runtime.inner import MAX_COMPILED_SHAPES, DynamicCompiled


def _captured(fn, *args):
    """`fn` traced with symbolic sizes: placeholders whose meta["val"] holds every size as a symbol."""
    return make_fx(fn, tracing_mode="symbolic")(*args)


def _double(x, y):
    return x * 2 + y.sum()


def test_a_guard_the_compiler_adds_is_checked_on_every_call():
    gm = _captured(_double, torch.randn(4, 3), torch.randn(5))
    seen = []

    def compile_fakes(fakes):
        # a compiler decision on a symbolic size adds a guard to the fresh ShapeEnv
        seen.append(("even" if fakes[0].shape[0] % 2 == 0 else "odd", tuple(type(s).__name__ for s in fakes[0].shape)))
        return gm.forward

    compiled = DynamicCompiled(gm, compile_fakes)
    args = [(torch.randn(4, 3), torch.randn(5)), (torch.randn(6, 3), torch.randn(2)), (torch.randn(3, 3), torch.randn(5))]
    for x, y in args:
        torch.testing.assert_close(compiled(x, y), _double(x, y))
    # 4 and 6 rows share the "even" compile; 3 rows breaks its guard and compiles again
    assert compiled.compiles == 2
    assert seen[0][0] == "even" and seen[1][0] == "odd"
    assert "SymInt" in seen[0][1]  # the row count was compiled as a symbol, not a constant


def test_the_table_is_bounded():
    gm = _captured(_double, torch.randn(4, 3), torch.randn(5))

    def compile_fakes(fakes):
        torch._check(fakes[0].shape[0] == int(fakes[0].shape[0].node.hint))  # specialise: one entry per size
        return gm.forward

    compiled = DynamicCompiled(gm, compile_fakes)
    for rows in range(2, 2 + MAX_COMPILED_SHAPES + 3):
        compiled(torch.randn(rows, 3), torch.randn(5))
    assert compiled.compiles == MAX_COMPILED_SHAPES + 3
    assert len(compiled.entries) == MAX_COMPILED_SHAPES
