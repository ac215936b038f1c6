"""Inner compilers: what runs the rewritten graph.

- `eager`: the rewritten GraphModule itself, op by op (the reference; what the tests compare).
- `inductor`: PyTorch's Inductor, through `compile_fx` with Dynamo's fake example inputs.
- `npugraph_ex`: torch_npu's graph-mode backend (Ascend only), looked up once `torch_npu` imports;
  where a torch_npu release registers no `npugraph_ex` Dynamo backend, torchair's `get_npu_backend()`
  (the same graph compiler) takes the graph. Either receives the rewritten graph, attention lowered to
  `torch.ops.npu.npu_fused_infer_attention_score`, which both convert to the fused kernel.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import torch
import torch.fx as fx

from npu_dit.errors import UserError

MAX_COMPILED_SHAPES = 8  # per region: the last few resolutions / prompt lengths stay compiled


def compile_inner(gm: fx.GraphModule, example_inputs: list[Any], name: str, *, mode: str | None = None) -> Callable:
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
    inputs, scalars): eager runs it as is; a graph compiler gets it on its first call, with the real
    local inputs, once per input-shape signature (a denoising loop keeps its shapes for all steps)."""
    if name == "eager":
        return gm.forward
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = torch._inductor.list_mode_options(mode) if mode else None

        def compile_for(args: list[Any]) -> Callable:
            return compile_fx(gm, args, config_patches=patches)

    elif name == "npugraph_ex":
        backend = _npugraph_ex()

        def compile_for(args: list[Any]) -> Callable:
            return backend(gm, args)

    else:
        raise UserError(f"unknown inner compiler {name!r}; choose eager, inductor or npugraph_ex")
    compiled: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()

    def run(*args: Any) -> Any:
        # strides too: a compiled graph asserts its inputs' strides (a strided slice and a contiguous
        # tensor of one shape need two entries)
        key = tuple((tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a for a in args)
        if key not in compiled:
            compiled[key] = compile_for(list(args))
            if len(compiled) > MAX_COMPILED_SHAPES:
                compiled.popitem(last=False)  # least recently used
        compiled.move_to_end(key)
        return compiled[key](*args)

    return run
