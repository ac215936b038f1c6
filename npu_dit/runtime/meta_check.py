"""A check that can fail: on the first call of a rewritten graph, every node's recorded shape
(`meta["val"]`, what the passes computed for this rank) must equal the shape of the real tensor the
node produces on this rank. Symbols are bound from the placeholders' real sizes (a sharded input's
local length, the global lengths the executor passes); a size whose symbols are all bound must
evaluate to the real size. On with `NPU_DIT_CHECK_META=1` (tests, debugging); off, it costs nothing."""

from __future__ import annotations

from typing import Any, Callable

import sympy
import torch
import torch.fx as fx


class MetaMismatch(AssertionError):
    pass


class _Checker(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.bindings: dict[sympy.Symbol, int] = {}
        self.problems: list[str] = []

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        recorded = node.meta.get("val")
        if node.op == "placeholder":
            self.bind(recorded, result)
        elif isinstance(recorded, torch.Tensor) and isinstance(result, torch.Tensor):
            self.compare(node, recorded, result)
        elif isinstance(recorded, (list, tuple)) and isinstance(result, (list, tuple)):
            for r, v in zip(recorded, result):
                if isinstance(r, torch.Tensor) and isinstance(v, torch.Tensor):
                    self.compare(node, r, v)
        return result

    def bind(self, recorded: Any, real: Any) -> None:
        if isinstance(recorded, torch.SymInt) and isinstance(real, int):
            expr = recorded.node.expr
            if isinstance(expr, sympy.Symbol):
                self.bindings.setdefault(expr, sympy.Integer(real))
        elif isinstance(recorded, torch.Tensor) and isinstance(real, torch.Tensor):
            for size, value in zip(recorded.shape, real.shape):
                self.bind(size, int(value))

    def compare(self, node: fx.Node, recorded: torch.Tensor, real: torch.Tensor) -> None:
        if len(self.problems) >= 5:
            return
        if recorded.dim() != real.dim():
            self.problems.append(f"{node.name}: recorded {list(recorded.shape)}, runs to {list(real.shape)}")
            return
        for d, (size, value) in enumerate(zip(recorded.shape, real.shape)):
            expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))
            known = expr.xreplace(self.bindings)
            if known.free_symbols:
                if isinstance(expr, sympy.Symbol):
                    self.bindings[expr] = sympy.Integer(int(value))  # a size first seen here (data-dependent)
                continue
            if int(known) != int(value):
                self.problems.append(f"{node.name} dim {d}: recorded {expr} = {int(known)}, the rank computes {int(value)}")
                return


def check_meta(gm: fx.GraphModule, args: tuple) -> list[str]:
    checker = _Checker(gm)
    checker.run(*args)
    return checker.problems


class MetaChecked:
    """Runs `inner`, checking the graph's recorded shapes against a real run on the first call."""

    def __init__(self, gm: fx.GraphModule, inner: Callable) -> None:
        self.gm, self.inner, self.checked = gm, inner, False

    def __call__(self, *args: Any) -> Any:
        if not self.checked:
            self.checked = True
            problems = check_meta(self.gm, args)
            if problems:
                raise MetaMismatch("npu_dit: recorded shapes differ from this rank's real values: " + "; ".join(problems))
        return self.inner(*args)
