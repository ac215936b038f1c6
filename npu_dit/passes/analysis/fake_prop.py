"""Fresh shapes for a rewritten graph: fake propagation from new placeholder values.

After the Ulysses rewrite the same Dynamo symbol would stand for a stream's global length (in the
tables built at full size) and for its local length (in every sharded tensor). `repropagate`
re-runs the graph on fake values in a NEW ShapeEnv where each placeholder gets the value this rank
really receives: sharded token dims and the SymInt inputs the executor refreshes get a *local*
symbol (`L0`, hint = this rank's chunk), the global-length inputs a *global* one (`G0`), every other
symbol a fresh copy. Afterwards every node's `meta["val"]` is the local value on this rank, and
later shape-based passes (the cache regions, tensor parallelism) read true shapes.

`stale_meta` is the runner's lint (one walk over the nodes: no value may be one recorded before the
pass); `meta_mismatches` is the thorough one (`NPU_DIT_LINT=1`, and the
tests): propagate again from the placeholders' current values and list the nodes whose recorded
shape differs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._sympy.functions import Max
from torch.utils._pytree import tree_leaves, tree_map_only

from npu_dit.passes.analysis.attention_ops import node_value
from npu_dit.passes.analysis.symbolic import FACTS, carried_facts, exprs_equal


def shape_hint(env: ShapeEnv, expr: sympy.Expr) -> int:
    """The example value of a size expression, without adding a guard (torch 2.13's
    `optimization_hint`; `size_hint` where an older torch lacks it)."""
    values = getattr(env, "backed_var_to_val", None) or getattr(env, "var_to_val", None) or {}
    if expr.free_symbols and expr.free_symbols <= values.keys():
        found = expr.xreplace(values)  # a size expression at its symbols' values (~50x cheaper)
        if isinstance(found, sympy.Integer):
            return int(found)
    hint = getattr(env, "optimization_hint", None) or env.size_hint
    return int(hint(expr))


class SymbolMap:
    """Old symbols -> new symbols in a fresh ShapeEnv (same hints unless given)."""

    def __init__(self, specialize_zero_one: bool = True) -> None:
        # specialize_zero_one=False: a fresh symbol whose hint is 0 or 1 (a rank's share of a short
        # stream) stays a symbol, as the length it stands for varies from call to call
        self.env = ShapeEnv(specialize_zero_one=specialize_zero_one)
        self.mode = FakeTensorMode(shape_env=self.env, allow_non_fake_inputs=True)
        # the dispatch cache pays even in one pass: a transformer repeats the same ops on the same
        # symbolic shapes in every block (the 57-block FLUX.1-dev graph at 1024x1024: 40 s -> 24 s)
        self.mode.cache_enabled = True
        self.symbols: dict[sympy.Symbol, sympy.Expr] = {}
        self.hints: dict[sympy.Symbol, int] = {}  # old symbol -> its value on this rank, where it changes
        self.statics: dict[tuple, torch.Tensor] = {}
        # the ShapeEnvs the old symbols come from: their guards, in the new symbols, are facts here
        # too (Dynamo's `Eq((2*s69)//s28, 2)` on a mask's heads; `symbolic.carried_facts`)
        self.sources: list[ShapeEnv] = []
        self._facts: tuple[tuple[int, ...], tuple] | None = None
        setattr(self.env, FACTS, self.facts)

    def new_symbol(self, name: str, hint: int) -> sympy.Expr:
        return self.env.create_symbol(hint, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)

    def bind(self, old: sympy.Symbol, new: sympy.Expr) -> None:
        self.symbols[old] = new

    def size(self, value: Any) -> Any:
        """The new SymInt (or int) for an old size."""
        if not isinstance(value, torch.SymInt):
            return int(value)
        return self.expression(value.node.expr, value.node.shape_env, value.node.hint)

    def expression(self, expr: sympy.Expr, env: ShapeEnv, hint: int | None = None) -> Any:
        """The new SymInt (or int) for an old size expression of `env`'s symbols, after `env`'s
        replacements: a placeholder's value keeps the symbols it was made with (a mask's batch `s69`),
        while Dynamo later proved some equal (`s69 == s28`) and wrote the nodes after it with one; the
        copy must use one symbol for both or it propagates `(2*s69)//s28` where the graph holds 2."""
        if env is not None:
            expr = env.replace(expr)
            if not any(source is env for source in self.sources):
                self.sources.append(env)
        for symbol in expr.free_symbols:
            if symbol not in self.symbols:
                known = getattr(env, "backed_var_to_val", None) or {}
                hint_of = self.hints.get(symbol, known.get(symbol, hint or 2))
                self.symbols[symbol] = self.new_symbol(f"{symbol}", max(int(hint_of), 2))
        new = expr.xreplace(self.symbols)
        if not new.free_symbols:
            return int(new)
        return self.env.create_symintnode(new, hint=shape_hint(self.env, new))

    def facts(self) -> tuple:
        """The source ShapeEnvs' guards (and the facts they carry in turn) whose symbols all have new
        ones here, written in the new symbols."""
        key = (len(self.symbols), *(len(env.guards) for env in self.sources))
        if self._facts is not None and self._facts[0] == key:
            return self._facts[1]
        found = []
        for env in self.sources:
            for fact in (*(g.expr for g in env.guards), *carried_facts(env)):
                if fact.free_symbols and fact.free_symbols <= self.symbols.keys():
                    found.append(fact.xreplace(self.symbols))
        self._facts = (key, tuple(dict.fromkeys(found)))
        return self._facts[1]

    def tensor(self, value: torch.Tensor, sizes: list[Any] | None = None) -> torch.Tensor:
        sizes = sizes if sizes is not None else [self.size(s) for s in value.shape]
        static = all(isinstance(s, int) for s in sizes) and all(isinstance(s, int) for s in value.stride())
        # static tensors of one shape (a transformer's ~1,000 parameters come in a few dozen shapes)
        # share one fake value: nothing writes into a placeholder's fake value
        key = (tuple(sizes), tuple(value.stride()), value.dtype, value.device) if static else None
        found = self.statics.get(key) if key is not None else None
        if found is not None:
            return found
        with self.mode:
            if static:
                found = torch.empty_strided(sizes, value.stride(), dtype=value.dtype, device=value.device)
            else:
                found = torch.empty(sizes, dtype=value.dtype, device=value.device)
        if key is not None:
            self.statics[key] = found
        return found


def symbolic_dispatch() -> contextlib.AbstractContextManager:
    """Fake dispatch that keeps sizes symbolic, as Dynamo's own tracing does (PyTorch's Python dispatcher).

    Without it a composite op implemented in C++ (`constant_pad_nd` behind `F.pad`, the nearest
    upsampling kernels behind `F.interpolate`) reads its input's sizes through `aten.size.default`,
    whose fake handler turns every size into a plain int: in a fresh ShapeEnv each symbol is then
    fixed to its example value (a replacement `s -> hint`), the node's value holds numbers where the
    captured graph held `s + 2` or `2*s`, and so does every value computed from it. With the Python
    dispatcher those ops run their symbolic (SymInt) kernels, as under Dynamo."""
    from torch._dispatch.python import enable_python_dispatcher

    return enable_python_dispatcher()


# A node whose meta["val"] is given, not computed: the per-rank chunk lengths of a sharded token
# stream (`collectives.chunk_lengths`), which the Ulysses pass gives one fresh symbol each so that no
# shape downstream holds `(G + P - 1 - r) // P`. Every propagation takes the recorded value (in its
# own symbols) instead of running the node; what the node computes at run time is those lengths.
KEPT = "npu_dit.kept_value"


def kept_value(node: fx.Node, mapper: Callable[[Any], Any] | None = None) -> Any:
    """A KEPT node's recorded value, its SymInts put through `mapper` (another ShapeEnv's symbols)."""
    value = node.meta.get("val")
    return value if mapper is None else tree_map_only(torch.SymInt, mapper, value)


def repropagate(gm: fx.GraphModule, placeholder_values: list[Any],
                kept: Callable[[Any], Any] | None = None) -> None:
    """Set every node's meta["val"] by running the graph on fake `placeholder_values`; a KEPT node
    takes its recorded value (its SymInts through `kept` where the values are in another ShapeEnv)."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = next((v.fake_mode for v in placeholder_values if hasattr(v, "fake_mode")), None)
    if mode is None:
        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, placeholder_values):
        node.meta["val"] = value
    given = {n: kept_value(n, kept) for n in gm.graph.nodes if n.meta.get(KEPT)}
    for node in gm.graph.nodes:  # a node that returns nothing gets no value, not its old one
        if node.op != "placeholder":
            node.meta.pop("val", None)

    class _Prop(FakeTensorProp):
        def run_node(self, node: fx.Node) -> Any:
            if node in given:
                node.meta["val"] = given[node]
                return given[node]
            return super().run_node(node)

    with mode.shape_env.suppress_guards() if mode.shape_env is not None else contextlib.nullcontext(), \
            symbolic_dispatch():
        _Prop(gm, mode).propagate_dont_convert_inputs(*placeholder_values)


def copied_placeholder_values(gm: fx.GraphModule, symbols: SymbolMap,
                              override: Callable[[int, fx.Node], Any] | None = None) -> list[Any]:
    """Fake values for the placeholders in `symbols`' ShapeEnv; `override(i, node)` may supply one."""
    values = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        given = override(i, node) if override is not None else None
        if given is not None:
            values.append(given)
            continue
        value = node_value(node)
        if isinstance(value, torch.Tensor):
            values.append(symbols.tensor(value))
        elif isinstance(value, torch.SymInt):
            values.append(symbols.size(value))
        else:
            values.append(value)
    return values


def meta_mismatches(gm: fx.GraphModule, limit: int = 5, strides: bool = False) -> list[str]:
    """Propagate again from the placeholders' recorded values; list nodes whose recorded shape (and,
    with `strides`, strides) differs."""
    recorded = {n: node_value(n) for n in gm.graph.nodes}
    symbols = SymbolMap()
    values = copied_placeholder_values(gm, symbols)
    saved = {n: n.meta["val"] for n in gm.graph.nodes if "val" in n.meta}
    try:
        repropagate(gm, values, kept=symbols.size)
        fresh = {n: n.meta.get("val") for n in gm.graph.nodes}
    finally:
        for n in gm.graph.nodes:
            n.meta.pop("val", None)
            if n in saved:
                n.meta["val"] = saved[n]
    problems = []
    for node, old in recorded.items():
        new = fresh.get(node)
        if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
            old_shape = [symbols.size(s) for s in old.shape]
            if len(old_shape) != len(new.shape) or not all(_same(a, b, symbols.env) for a, b in zip(old_shape, new.shape)):
                problems.append(f"{node.name}: recorded {list(old_shape)}, propagates to {list(new.shape)}")
            elif strides:
                old_stride = [symbols.size(s) for s in old.stride()]
                # a size-1 dim's stride is never read: compare the others
                if not all(_same_stride(a, b) or _same(a, b) for a, b, n in zip(old_stride, new.stride(), new.shape)
                           if not _same(n, 1)):
                    problems.append(f"{node.name}: recorded strides {old_stride}, propagates to {list(new.stride())}")
            if len(problems) >= limit:
                break
    return problems


def recorded_values(gm: fx.GraphModule) -> dict[int, Any]:
    """The tensors and SymInts in the non-placeholder nodes' meta["val"], by id (kept alive so ids
    stay unique): what a shape-changing pass must have replaced."""
    values = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            for value in tree_leaves(node.meta.get("val")):
                if isinstance(value, (torch.Tensor, torch.SymInt)):
                    values[id(value)] = value
    return values


def stale_meta(gm: fx.GraphModule, before: dict[int, Any], limit: int = 5) -> list[str]:
    """Nodes whose value is one recorded before the pass (`recorded_values`): a shape-changing pass
    ends by propagating its whole graph again (`repropagate`), which gives every node a new value;
    a value left from before the rewrite, or copied from an old node, is stale."""
    problems = []
    for node in gm.graph.nodes:
        if node.op == "placeholder" or node.meta.get(KEPT):  # given lengths, not propagated
            continue
        old = [v for v in tree_leaves(node.meta.get("val")) if id(v) in before and before[id(v)] is v]
        if old:
            problems.append(f"{node.name}: its value ({old[0]!r}) is one from before the pass (not propagated again)")
            if len(problems) >= limit:
                break
    return problems


def _same(a: Any, b: Any, env: ShapeEnv | None = None) -> bool:
    """Equal sizes: the same expression, equal wherever the symbols are evaluated (sympy cannot
    always cancel floor divisions: `((h*(w//4) + h*((w//2 + 1)//2)) // (w//2)` is `h` for every w), or
    equal by a guard `env` carries from Dynamo's trace (`Eq((2*s69)//s28, 2)`)."""
    ea = a.node.expr if isinstance(a, torch.SymInt) else sympy.Integer(int(a))
    eb = b.node.expr if isinstance(b, torch.SymInt) else sympy.Integer(int(b))
    if ea == eb or sympy.expand(ea - eb) == 0:
        return True
    symbols = sorted(ea.free_symbols | eb.free_symbols, key=str)
    if not symbols:
        return False
    for k in range(6):  # a few points (several residues of every symbol), never only the hint
        point = {x: sympy.Integer(2 + 7 * k + 3 * i + (k * i) % 5) for i, x in enumerate(symbols)}
        try:
            differ = ea.xreplace(point) != eb.xreplace(point)
        except (TypeError, ZeroDivisionError):
            differ = True
        if differ:
            return env is not None and exprs_equal(ea, eb, env)
    return True


class _Refresh(torch.fx.Interpreter):
    """Runs the graph on fake values, except that a node the rewrite left untouched gets its old
    value with the symbols substituted (`rename(node)`: old symbol -> new expression, or None to run
    the node), and an inserted call with a shape rule (`rules[target](*args, **kwargs)` -> (sizes,
    dtype), npu-dit's collectives and attention) gets a value built from that rule. Running a node is
    a dispatch through the fake tensor mode (about a millisecond with symbolic sizes); substituting is
    a dictionary walk per size, and values of equal shape are one fake tensor, so the 57 alike blocks
    of FLUX.1-dev cost about what one does."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, symbols: SymbolMap | None,
                 rename: Callable[[fx.Node], Any], rules: dict | None = None,
                 given: dict[fx.Node, Any] | None = None) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.mode, self.symbols, self.rename = mode, symbols, rename
        self.rules = rules or {}
        self.given = given or {}  # KEPT nodes' values, already in the new ShapeEnv
        self.sizes: dict[tuple, Any] = {}
        self.fakes: dict[tuple, torch.Tensor] = {}
        self.substitutions: dict[tuple, torch.Tensor] = {}
        self.mappings: dict[int, Any] = {}
        self.substituted = self.by_rule = 0
        self.ran: list[fx.Node] = []  # nodes run on fake values (neither substituted nor by rule)

    def run_node(self, node: fx.Node) -> Any:
        if node.meta.get(KEPT) and node.op != "placeholder":
            value = node.meta["val"] if self.symbols is None else self.given.get(node)
            if value is None:
                value = kept_value(node, lambda v: self.size(v, {}))
            node.meta["val"] = value
            return value
        if node.op not in ("placeholder", "output", "get_attr"):
            mapping = self.rename(node)
            old = node.meta.get("val")
            if isinstance(mapping, Rewired):
                mapping = mapping.symbols if self.inputs_match(mapping) else None
            if mapping is not None and _substitutable(old):
                if isinstance(mapping, Resize):
                    if isinstance(old, torch.Tensor) and len(mapping.dims) == 1:
                        value = self.tensor(old, mapping.symbols, mapping.dims[0])
                    else:
                        resize = iter(mapping.dims)
                        value = tree_map_only(torch.Tensor, lambda t: self.tensor(t, mapping.symbols, next(resize)),
                                              old)
                elif isinstance(old, torch.Tensor):
                    value = self.tensor(old, mapping)
                else:
                    value = tree_map_only(torch.Tensor, lambda t: self.tensor(t, mapping), old)
                node.meta["val"] = value
                self.substituted += 1
                return value
            rule = self.rules.get(node.target) if node.op == "call_function" else None
            if rule is not None:
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                try:
                    sizes, dtype, device = rule(*args, **kwargs)
                except Exception:  # noqa: BLE001 - a call the rule does not cover: run it
                    pass
                else:
                    value = self.fake(sizes, [], dtype, device, False)
                    node.meta["val"] = value
                    self.by_rule += 1
                    return value
        if node.op not in ("placeholder", "output"):
            self.ran.append(node)
        with self.mode:
            value = super().run_node(node)
        if node.op == "get_attr" and isinstance(value, torch.Tensor):
            value = self.mode.from_tensor(value)
        if node.op != "output":
            node.meta.pop("val", None)
            if value is not None:
                node.meta["val"] = value
        return value

    def inputs_match(self, rewired: Rewired) -> bool:
        """Whether every input listed (the ones the rewrite swapped) has the value (sizes, strides,
        dtype) the input it replaced had, with the node's own symbol mapping put in: then the node
        computes what it did."""
        return all(self.matches(old, self.env.get(new), rewired.symbols) for new, old in rewired.inputs)

    def matches(self, old: Any, value: Any, mapping: dict) -> bool:
        if isinstance(old, torch.Tensor) and isinstance(value, torch.Tensor):
            if (old.dtype, old.device, old.dim()) != (value.dtype, value.device, value.dim()):
                return False
            mapped = self.tensor(old, mapping)  # memoised: an input substituted itself is this very value
            if mapped is value:
                return True
            return ([_key(s) for s in mapped.shape] == [_key(s) for s in value.shape]
                    and all(_same_stride(a, b) for a, b in zip(mapped.stride(), value.stride())))
        if isinstance(old, (torch.SymInt, int)) and isinstance(value, (torch.SymInt, int)):
            return _key(self.size(old, mapping)) == _key(value)
        if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
            return len(old) == len(value) and all(self.matches(a, b, mapping) for a, b in zip(old, value))
        if isinstance(old, (float, bool, type(None))) and type(old) is type(value):
            return old == value
        return old is value and not isinstance(old, torch.SymInt)  # a placeholder's SymFloat, kept as it was

    def size(self, value: Any, mapping: dict) -> Any:
        if not isinstance(value, torch.SymInt):
            return int(value)
        if self.symbols is None:
            return value  # the same ShapeEnv: symbols stay
        key = (value.node.expr, id(mapping))
        found = self.sizes.get(key)
        if found is None:
            expr = value.node.expr
            for symbol in expr.free_symbols:
                if symbol not in mapping and symbol not in self.symbols.symbols:
                    self.symbols.size(value)  # a fresh copy of a symbol the rewrite leaves alone
                    break
            new = put_in(expr, {**self.symbols.symbols, **mapping})
            if not new.free_symbols:
                found = int(new)
            else:
                found = self.symbols.env.create_symintnode(new, hint=shape_hint(self.symbols.env, new))
            self.sizes[key] = found
        return found

    def tensor(self, value: torch.Tensor, mapping: dict, resize: dict | None = None) -> torch.Tensor:
        # memoised on the old value's raw size expressions: most nodes of a transformer repeat a few
        # dozen shapes (the expressions' hashes are cached; `SymNode.expr` walks each one)
        key = (id(mapping) if self.symbols is not None else None, _raw(value.shape), _raw(value.stride()),
               tuple(resize.items()) if resize else (), value.dtype, value.device, value.requires_grad)
        found = self.substitutions.get(key)
        if found is None:
            found = self.substitutions[key] = self._tensor(value, mapping, resize)
            self.mappings[id(mapping)] = mapping  # keeps the id in the key unique
        return found

    def _tensor(self, value: torch.Tensor, mapping: dict, resize: dict | None = None) -> torch.Tensor:
        sizes = [self.size(s, mapping) for s in value.shape]
        strides = [self.size(s, mapping) for s in value.stride()]
        if resize:
            for dim, size in resize.items():
                sizes[dim] = size
            strides = []  # a dim changed size: contiguous
        return self.fake(sizes, strides, value.dtype, value.device, value.requires_grad)

    def fake(self, sizes: list, strides: list, dtype: torch.dtype, device: torch.device,
             requires_grad: bool) -> torch.Tensor:
        key = (tuple(_key(s) for s in sizes), tuple(_key(s) for s in strides), dtype, device, requires_grad)
        found = self.fakes.get(key)
        if found is None:
            # each key is made once (memoised here): the fake mode's dispatch cache would only add an
            # entry per shape, which costs more than the call with symbolic sizes (~7 ms)
            cache_enabled, self.mode.cache_enabled = self.mode.cache_enabled, False
            try:
                with self.mode:
                    if strides:
                        found = torch.empty_strided(sizes, strides, dtype=dtype, device=device)
                    else:
                        found = torch.empty(sizes, dtype=dtype, device=device)
            finally:
                self.mode.cache_enabled = cache_enabled
            if requires_grad:
                found.requires_grad_(True)
            self.fakes[key] = found
        return found


def put_in(expr: sympy.Expr, mapping: dict) -> sympy.Expr:
    """`expr` with `mapping` put in at once (old and new names may clash). A key may be an expression:
    - a sum (a stream's length the graph computes from grid sizes, `s47*s8 + s56*s86`) is replaced where
      it is a whole subterm, and also where its terms, times one number, are some of a larger sum's
      (`s39 + s47*s8 + s56*s86`, `2*s47*s8 + 2*s56*s86`);
    - a product (a patch grid's token count `(s1//2)*(s2//2)`) is replaced where it divides a product
      (`64*(s1//2)*(s2//2)`, a stride).
    Anything else of its symbols keeps its meaning (a symbol's copy)."""
    keys = [key for key in mapping if isinstance(key, _KEY_TYPES)]
    if keys and isinstance(expr, sympy.Expr):
        expr, stand_ins = stand_in_for_keys(expr, keys)
        mapping = {**mapping, **{stand_in: mapping[key] for key, stand_in in stand_ins.items()}}
    return expr.xreplace(mapping)


_KEY_TYPES = (sympy.Add, sympy.Mul, sympy.Pow)  # expression keys `put_in` looks for inside sizes


def stand_in_for_keys(expr: sympy.Expr, keys: list) -> tuple[sympy.Expr, dict]:
    """`expr` with each key expression (a sum or a product, as `put_in` reads them) replaced by a
    stand-in symbol where it occurs, and the stand-ins by key."""
    stand_ins: dict = {}
    sums = [key for key in keys if isinstance(key, sympy.Add)]
    products = [key for key in keys if isinstance(key, (sympy.Mul, sympy.Pow))]
    if sums and expr.has(sympy.Add):
        def swap(term: sympy.Expr) -> sympy.Expr:
            args = set(term.args)
            for key in sums:
                # sympy distributes a number over a sum (`2*(a + b)` is `2*a + 2*b`): look for k*key
                for factor in {a / key.args[0] for a in args}:
                    if not factor.is_Rational or factor == 0:
                        continue
                    scaled = {factor * a for a in key.args}
                    if scaled <= args and term != key:
                        stand_in = stand_ins.setdefault(key, sympy.Dummy())
                        return sympy.Add(factor * stand_in, *(args - scaled))
            return term

        expr = expr.replace(lambda e: isinstance(e, sympy.Add), swap)
    if products and expr.has(*[b for key in products for b in key.as_powers_dict()]):
        def divide(term: sympy.Expr) -> sympy.Expr:
            for key in products:
                if term == key:
                    return stand_ins.setdefault(key, sympy.Dummy())
                rest = term / key
                powers = rest.as_powers_dict()
                # the key divides the term: no factor of the key is left in a denominator
                if rest != term and all(powers.get(base, 0) >= 0 for base in key.as_powers_dict()):
                    return rest * stand_ins.setdefault(key, sympy.Dummy())
            return term

        expr = expr.replace(lambda e: isinstance(e, (sympy.Mul, sympy.Pow)), divide)
    return expr, stand_ins


def _raw(sizes: Any) -> tuple:
    """Sizes as their SymNodes' stored expressions (no replacement lookup): a memo key."""
    return tuple(s.node._expr if isinstance(s, torch.SymInt) else int(s) for s in sizes)


def _key(size: Any) -> Any:
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


class Resize(NamedTuple):
    """An untouched node whose dims change by a constant (tensor parallelism's local feature
    sizes): the symbol mapping, and per tensor output {dim: new size}."""

    symbols: dict
    dims: list


def _same_stride(a: Any, b: Any) -> bool:
    """Equal strides, reading `Max(1, size)` as `size`: a contiguous tensor made with symbolic sizes
    (`torch.empty`) guards each stride against a size of 0, where the tensor holds nothing."""
    ea, eb = _key(a), _key(b)
    if ea == eb:
        return True
    one = sympy.Integer(1)
    ea, eb = (e.replace(lambda x: isinstance(x, (sympy.Max, Max)) and len(x.args) == 2 and one in x.args,
                        lambda x: next(y for y in x.args if y != one)) if isinstance(e, sympy.Expr) else e
              for e in (sympy.sympify(ea), sympy.sympify(eb)))
    return sympy.expand(ea - eb) == 0


class Rewired(NamedTuple):
    """A node the rewrite re-wired: substituted like an untouched node (`symbols`) when each swapped
    input (`inputs`: new input node, value of the input it replaced) has the old value with `symbols`
    put in; run otherwise."""

    symbols: dict
    inputs: list


def swapped_inputs(old: Any, new: Any) -> list[tuple[fx.Node, fx.Node]] | None:
    """The (new, old) node pairs where `new` (a node's arguments now) differs from `old` (its
    arguments before the rewrite) only by nodes put in place of nodes; None if anything else differs."""
    pairs: list[tuple[fx.Node, fx.Node]] = []

    def walk(a: Any, b: Any) -> bool:
        if a is b:
            return True
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            if isinstance(a, fx.Node) and isinstance(b, fx.Node):
                pairs.append((b, a))
                return True
            return False
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
            return len(a) == len(b) and all(walk(x, y) for x, y in zip(a, b))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(walk(a[k], b[k]) for k in a)
        if type(a) is not type(b) or isinstance(a, (torch.Tensor, torch.SymInt)):
            return False
        try:
            return bool(a == b)
        except Exception:  # noqa: BLE001 - not comparable: treat as changed
            return False

    return pairs if walk(old, new) else None


def _substitutable(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    leaves = tree_leaves(value)
    return bool(leaves) and all(isinstance(v, torch.Tensor) for v in leaves)


def refresh(gm: fx.GraphModule, placeholder_values: list[Any], symbols: SymbolMap | None,
            rename: Callable[[fx.Node], Any], rules: dict | None = None,
            mode: FakeTensorMode | None = None, given: dict[fx.Node, Any] | None = None) -> RefreshStats:
    """Give every node its new meta["val"]: substituted where `rename(node)` gives a symbol mapping
    (a node the rewrite left as it was) or a `Rewired` whose swapped inputs have their old values with
    the mapping put in, by a shape rule where `rules` has one for the target, run on fake values
    elsewhere (inserted nodes, re-wired nodes whose inputs changed, sizes). Returns how many nodes were
    substituted, how many built by rule, and the nodes run."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, placeholder_values):
        node.meta["val"] = value
    mode = symbols.mode if symbols is not None else mode
    interpreter = _Refresh(gm, mode, symbols, rename, rules, given)
    with mode.shape_env.suppress_guards(), symbolic_dispatch():
        interpreter.run(*placeholder_values)
    return RefreshStats(interpreter.substituted, interpreter.by_rule, interpreter.ran)


class RefreshStats(NamedTuple):
    substituted: int
    by_rule: int
    ran: list
