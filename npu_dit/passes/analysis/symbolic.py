"""One answer to "are these two sizes equal?" for every analysis and pass.

Equal example values prove nothing (two streams of 12 tokens are not one stream): two size expressions
are equal only when that is proven, structurally, by expansion (a polynomial's expanded form is
canonical), by `simplify` where floor divisions remain (only where asked: about 10 ms a call, and its
first call imports sympy.physics), or from a ShapeEnv's guards and replacements (Dynamo asserts
`s50 == s8*s47` when it traces a broadcast of the two)."""

from __future__ import annotations

from typing import Any

import sympy
import torch


# A ShapeEnv made for a rewrite (`fake_prop.SymbolMap`) carries, under this attribute, a callable giving
# the guards of the ShapeEnv(s) its symbols were copied from, written in its own symbols: what Dynamo
# proved while tracing (`Eq((2*s69)//s28, 2)`) stays proven after the copy.
FACTS = "_npu_dit_facts"


def carried_facts(env: Any) -> tuple:
    """The facts `env` carries from the ShapeEnv(s) it was copied from (none for Dynamo's own)."""
    facts = getattr(env, FACTS, None)
    return facts() if facts is not None else ()


def size_expr(size: Any) -> sympy.Expr:
    """A size (SymInt or int) as a sympy expression."""
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def exprs_equal(a: Any, b: Any, shape_env: Any = None, *, simplify: bool = False) -> bool:
    if a == b:
        return True
    try:
        difference = sympy.expand(a - b)
    except Exception:  # noqa: BLE001 - an expression sympy cannot subtract or expand
        return False
    if difference == 0:
        return True
    if simplify and not (difference.is_number or difference.is_polynomial()) and sympy.simplify(difference) == 0:
        return True
    if shape_env is None:
        return False
    try:
        if shape_env._maybe_evaluate_static(sympy.Eq(a, b)) == sympy.true:
            return True
        facts = carried_facts(shape_env)
        return bool(facts) and shape_env._maybe_evaluate_static(sympy.Eq(a, b), axioms=facts) == sympy.true
    except Exception:  # noqa: BLE001 - an expression the ShapeEnv cannot reason about
        return False
