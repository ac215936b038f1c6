"""Inner compilers: what runs the rewritten graph.

- `eager`: the rewritten GraphModule itself, op by op (the reference; what the tests compare).
- `inductor`: PyTorch's Inductor, through `compile_fx` with Dynamo's fake example inputs.
- `npugraph_ex`: torch_npu's graph-mode backend (Ascend only), looked up once `torch_npu` imports;
  where a torch_npu release registers no `npugraph_ex` Dynamo backend, torchair's `get_npu_backend()`
  (the same graph compiler) takes the graph. Either receives the rewritten graph, attention lowered to
  `torch.ops.npu.npu_fused_infer_attention_score`, which both convert to the fused kernel.
"""

from __future__ import annotations

import contextlib
import os

import collections
import time
from typing import Any, Callable

import torch
import torch.fx as fx

from npu_dit import progress
from npu_dit.errors import UserError

MAX_COMPILED_SHAPES = 8  # per region: the last few resolutions / prompt lengths stay compiled


def compile_inner(gm: fx.GraphModule, example_inputs: list[Any], name: str, *, mode: str | None = None) -> Callable:
    if os.environ.get("NPU_DIT_CHECK_META") == "1":
        from npu_dit.runtime.meta_check import MetaChecked

        with _without_check():
            return MetaChecked(gm, compile_inner_lazily(gm, name, mode=mode))
    if name == "eager":
        return gm.forward
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = torch._inductor.list_mode_options(mode) if mode else None
        return compile_fx(gm, example_inputs, config_patches=patches)
    if name == "npugraph_ex":
        return _npugraph_ex()(gm, example_inputs)
    raise UserError(f"unknown inner compiler {name!r}; choose eager, inductor or npugraph_ex")


def _npugraph_ex() -> Callable:
    try:
        import torch_npu  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or CANN libraries missing
        raise UserError(
            "inner_compiler='npugraph_ex' needs torch_npu with Ascend's CANN toolkit, which could not be "
            f"imported here ({type(exc).__name__}: {exc}). Install torch_npu on an Ascend machine "
            "(pip install 'npu-dit[npu]'), or use inner_compiler='eager' or 'inductor'."
        ) from exc
    from torch._dynamo.backends.registry import lookup_backend

    try:
        return lookup_backend("npugraph_ex")
    except Exception:  # noqa: BLE001 - older torch_npu: torchair is the graph-mode entry point
        pass
    try:
        import torchair

        return torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
    except Exception as exc:  # noqa: BLE001
        raise UserError(
            "this torch_npu has neither an 'npugraph_ex' Dynamo backend nor torchair; upgrade torch_npu, "
            "or use inner_compiler='eager' or 'inductor'"
        ) from exc


def compile_inner_lazily(gm: fx.GraphModule, name: str, *, mode: str | None = None) -> Callable:
    """For a graph whose inputs no longer match Dynamo's example inputs (sharded shapes, extra length
    inputs, scalars, cache regions): eager runs it as is; a graph compiler gets it on its first call.

    Inductor compiles it once with dynamic shapes, as Dynamo does for the captured graph: the sizes
    the placeholders' `meta["val"]` hold as symbols (token lengths, batch, resolution) become symbols
    of a fresh ShapeEnv with the first call's values as hints, everything else stays static. The
    guards Inductor adds while compiling are kept with the compiled code and checked on every call;
    only a call that breaks them compiles again (at most MAX_COMPILED_SHAPES entries, least recently
    used dropped). npugraph_ex takes real inputs, once per input signature.
    """
    if os.environ.get("NPU_DIT_CHECK_META") == "1":
        from npu_dit.runtime.meta_check import MetaChecked

        with _without_check():
            return MetaChecked(gm, compile_inner_lazily(gm, name, mode=mode))
    if name == "eager":
        return gm.forward
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = torch._inductor.list_mode_options(mode) if mode else None
        return DynamicCompiled(gm, lambda fakes: compile_fx(gm, fakes, config_patches=patches))
    if name == "npugraph_ex":
        backend = _npugraph_ex()
        return _PerSignature(lambda args: backend(gm, args))
    raise UserError(f"unknown inner compiler {name!r}; choose eager, inductor or npugraph_ex")


@contextlib.contextmanager
def _without_check():
    saved = os.environ.pop("NPU_DIT_CHECK_META", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["NPU_DIT_CHECK_META"] = saved


def _signature(args: tuple) -> tuple:
    # strides too: a compiled graph asserts its inputs' strides (a strided slice and a contiguous
    # tensor of one shape need two entries)
    return tuple((tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a for a in args)


class _PerSignature:
    """One compile per exact input signature (shapes, strides, scalars), LRU-bounded."""

    def __init__(self, compile_for: Callable[[list[Any]], Callable]) -> None:
        self.compile_for = compile_for
        self.compiled: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()
        self.compiles = 0

    def __call__(self, *args: Any) -> Any:
        key = _signature(args)
        if key not in self.compiled:
            start = time.perf_counter()
            self.compiled[key] = self.compile_for(list(args))
            progress.inner_compiled_lazily("npugraph_ex", time.perf_counter() - start)
            self.compiles += 1
            if len(self.compiled) > MAX_COMPILED_SHAPES:
                self.compiled.popitem(last=False)  # least recently used
        self.compiled.move_to_end(key)
        return self.compiled[key](*args)


class DynamicCompiled:
    """A graph compiled with symbolic sizes, re-used while its shape guards hold."""

    def __init__(self, gm: fx.GraphModule, compile_fakes: Callable[[list[Any]], Callable]) -> None:
        self.compile_fakes = compile_fakes
        self.dynamic = [_dynamic_dims(n) for n in gm.graph.nodes if n.op == "placeholder"]
        # (guarded input positions, guard or None, static key, compiled callable), most recent first
        self.entries: list[tuple[tuple[int, ...], Callable | None, tuple, Callable]] = []
        self.compiles = 0
        self.compile_seconds = 0.0

    def _static_key(self, args: tuple) -> tuple:
        """What the guards leave out: the value of every input compiled as a constant."""
        key = []
        for a, dyn in zip(args, self.dynamic):
            if isinstance(a, torch.Tensor):
                key.append((a.dtype, a.device, a.dim()))
            elif dyn is None:
                key.append(a)
        return tuple(key)

    def __call__(self, *args: Any) -> Any:
        static = self._static_key(args)
        for i, (positions, guard, key, fn) in enumerate(self.entries):
            if key == static and (guard is None or guard(args)):
                if i:
                    self.entries.insert(0, self.entries.pop(i))  # most recently used first
                return fn(*args)
        fn = self._compile(args, static)
        return fn(*args)

    def _compile(self, args: tuple, static: tuple) -> Callable:
        from torch._dynamo.source import LocalSource
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

        # 0 and 1 stay symbols too, so no size is fixed without a guard that says so
        env = ShapeEnv(specialize_zero_one=False)
        mode = FakeTensorMode(shape_env=env)
        fakes: list[Any] = []
        positions: list[int] = []
        for i, (a, dyn) in enumerate(zip(args, self.dynamic)):
            source = LocalSource(f"t{len(positions)}")
            if isinstance(a, torch.Tensor):
                dims = dyn or frozenset()
                context = StatelessSymbolicContext(
                    dynamic_sizes=[DimDynamic.DYNAMIC if d in dims else DimDynamic.STATIC for d in range(a.dim())]
                )
                fakes.append(mode.from_tensor(a, source=source, symbolic_context=context))
                if dims:
                    positions.append(i)
            elif isinstance(a, int) and not isinstance(a, bool) and dyn is not None:
                symbol = env.create_symbol(a, source, dynamic_dim=DimDynamic.DYNAMIC)
                fakes.append(env.create_symintnode(symbol, hint=a, source=source))
                positions.append(i)
            else:
                fakes.append(a)
        start = time.perf_counter()
        fn = self.compile_fakes(fakes)
        seconds = time.perf_counter() - start
        self.compile_seconds += seconds
        progress.inner_compiled_lazily("inductor", seconds)
        self.compiles += 1
        code = env.produce_guards_expression([fakes[p] for p in positions], ignore_static=False) if positions else None
        self.entries.insert(0, (tuple(positions), _guard_function(code, positions), static, fn))
        del self.entries[MAX_COMPILED_SHAPES:]
        return fn


def _guard_function(code: str | None, positions: list[int]) -> Callable[[tuple], bool] | None:
    """ShapeEnv's guard expression (the one `evaluate_guards_expression` evaluates), compiled once."""
    if code is None:
        return None
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    compiled = compile(code, "<npu_dit shape guards>", "eval")
    names = [f"t{i}" for i in range(len(positions))]

    def guard(args: tuple) -> bool:
        return bool(eval(compiled, SYMPY_INTERP, {"L": {n: args[p] for n, p in zip(names, positions)}}))

    return guard


def _dynamic_dims(node: fx.Node) -> frozenset[int] | None:
    """For a placeholder: the dims its recorded value holds as symbols (a tensor; may be empty),
    {0} for a symbolic int, None for a value compiled as a constant."""
    value = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(value, torch.Tensor):
        return frozenset(d for d, size in enumerate(value.shape) if _is_symbolic(size))
    if isinstance(value, torch.SymInt):
        return frozenset({0}) if _is_symbolic(value) else None
    return None


def _is_symbolic(size: Any) -> bool:
    return isinstance(size, torch.SymInt) and bool(size.node.expr.free_symbols)
