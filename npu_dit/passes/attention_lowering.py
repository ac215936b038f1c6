"""Attention lowering: each SDPA call becomes the best kernel that accepts it, in the layout that needs
no transposes.

Before (as Dynamo captures it, or as Ulysses wrapped it):

    q = permute(q_BSND, 0, 2, 1, 3)                     # and k, v
    o = scaled_dot_product_attention(q, k, v, attn_mask=keep_BKV)
    o_BSND = permute(o, 0, 2, 1, 3)

After, with attention_backend="npu_fia" (or auto on an NPU):

    masked_out = contiguous(expand(logical_not(keep_BKV), [-1, -1, S, -1]))   # 1 = masked OUT
    o_BSND = npu_fused_infer_attention_score(q_BSND, k_BSND, v_BSND, atten_mask=masked_out,
                 num_heads=N, scale=1/sqrt(D), input_layout="BSND", inner_precise=2)[0]

Under Ulysses the ops between the permutes and the call (pad_heads, the all-to-all start/wait, split and
cat of replicated runs, strip_heads, the all-gathers) are re-emitted with their sequence and head axes
swapped, so the all-to-all delivers [B, S, N/P, D] straight to the kernel and takes its output back
without a transpose (`analysis/attention_layout.py`). A kernel that reads only BNSD (PyTorch's SDPA
kernels, or an NPU call whose paths hold an op the layout analysis does not know) gets the call as it is.

Which kernel: `attention_kernels.AttentionKernelRegistry.select` per call (`auto`: first accepting kernel;
forced: that kernel, or a `UserError` naming the site, the kernel and its reason). `auto` keeps SDPA on
a CPU, so with no accelerator the pipeline does not include this pass.
Preconditions: attention is SDPA with example values (meta["val"]).
Postconditions: lowered calls carry meta["npu_dit.attention_layout"]; gm.meta["npu_dit.attention_kernels"]
lists each site's kernel, layout and the reasons the others refused.
Pipeline position: after ulysses and async_ulysses (it lowers the attention Ulysses wrapped; the
async scheduler only knows SDPA), before cache_regions (which cuts the final graph).
"""

from __future__ import annotations

import collections
import contextlib
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from npu_dit.config import CompileConfig
from npu_dit.passes.analysis.attention_calls import Environment, call_info, sdpa_calls
from npu_dit.passes.analysis.attention_layout import AXIS_ARGS, bsnd_plan, swap_axis
from npu_dit.passes.analysis.attention_ops import ATTENTION_LAYOUT_KEY, graph_fake_mode, node_value, sdpa_args
from npu_dit.passes.attention_kernels import (
    AttentionKernel,
    AttentionKernelRegistry,
    KernelChoice,
    Operands,
    default_registry,
    register_lowered_targets,
)
from npu_dit.passes.infra import PassResult, UserError
from npu_dit.runtime.npu_attention import torch_npu_available

KERNELS_META_KEY = "npu_dit.attention_kernels"


def attention_environment(cfg: CompileConfig) -> Environment:
    return Environment(
        torch_npu=torch_npu_available(),
        cuda=torch.cuda.is_available(),
        graph_mode=cfg.inner_compiler == "npugraph_ex",
    )


def lowering_may_fire(cfg: CompileConfig) -> bool:
    """`sdpa`, and `auto` without an accelerator, keep every SDPA call: the pass need not run."""
    if cfg.attention_backend == "sdpa":
        return False
    return cfg.attention_backend != "auto" or torch_npu_available() or torch.cuda.is_available()


def attention_kernel_choices(
    gm: fx.GraphModule, *, backend: str, env: Environment, registry: AttentionKernelRegistry | None = None
) -> list[KernelChoice]:
    """Each SDPA call's kernel (or the forced kernel's refusal), in graph order. Changes nothing."""
    registry = registry or default_registry()
    return [registry.select(call_info(node, i, env), backend) for i, node in enumerate(sdpa_calls(gm))]


def _refusal(backend: str, refused: list[KernelChoice], registry: AttentionKernelRegistry) -> UserError:
    first = refused[0]
    accepting = [n for n in registry.names() if n not in first.refused]
    # kernels that run here through their reference op when forced (CPU without torch_npu)
    accepting += [f"{n} (reference op)" for n in registry.names()
                  if n in first.refused and n != backend and registry.select(first.call, n).kernel == n]
    more = f" ({len(refused) - 1} more site(s) refused too)" if len(refused) > 1 else ""
    return UserError(
        f"attention_backend={backend!r} cannot lower {first.call.site}: {first.refused[backend]}{more}. "
        f"Use attention_backend='auto' (a kernel per site), or one that accepts this call: {', '.join(accepting)}"
    )


def _group_notes(choices: list[KernelChoice]) -> list[str]:
    """One line per kernel and layout (`npu-dit inspect` lists the refusals per site)."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for choice in choices:
        groups[choice.label].append(choice.call.module or "root")
    notes = []
    for text, modules in groups.items():
        example = modules[0] + (", ..." if len(modules) > 1 else "")
        notes.append(f"{len(modules)} site(s) ({example}): {text}")
    return notes


class _Lowering:
    """Inserts nodes with meta["val"] computed on the graph's fake values (no guards added)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.graph = gm.graph
        self.fake_mode = graph_fake_mode(gm)
        if self.fake_mode is None:
            raise RuntimeError("attention lowering needs the graph's example values (meta['val'])")
        self.stack: Any = None

    def build(self, fn: Callable | str, args: tuple, kwargs: dict | None = None) -> fx.Node:
        """Insert `fn(*args, **kwargs)` (a method call when `fn` is a name) at the insert point."""
        if isinstance(fn, str):
            node = self.graph.call_method(fn, args, kwargs or {})
            method = fn
            fn = lambda self_, *rest, **kw: getattr(self_, method)(*rest, **kw)  # noqa: E731
        else:
            node = self.graph.call_function(fn, args, kwargs or {})
        if self.stack is not None:
            node.meta["nn_module_stack"] = self.stack
        args_v, kwargs_v = tree_map(lambda a: node_value(a) if isinstance(a, fx.Node) else a, (args, kwargs or {}))
        # never add guards to Dynamo's ShapeEnv: they would become guards of the user's frame
        shape_env = self.fake_mode.shape_env
        with self.fake_mode, shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext():
            node.meta["val"] = fn(*args_v, **kwargs_v)
        return node

    def twin(self, node: fx.Node, twins: dict[fx.Node, fx.Node]) -> fx.Node:
        """`node` re-emitted for BSND operands: same op, sequence and head axes swapped."""
        self.stack = node.meta.get("nn_module_stack")
        if node.target is operator.getitem:
            return self.build(operator.getitem, (twins[node.args[0]], node.args[1]))
        args = list(node.args)
        args[0] = [twins[p] for p in args[0]] if node.target is torch.cat else twins[args[0]]
        for position in AXIS_ARGS[node.target]:
            if position < len(args):
                args[position] = swap_axis(args[position])
        kwargs = {k: swap_axis(v) if k == "dim" else v for k, v in node.kwargs.items()}
        return self.build(node.target, tuple(args), kwargs)

    def lower(self, call: fx.Node, choice: KernelChoice, kernel: AttentionKernel) -> int:
        """Replace `call`; return how many permutes were removed."""
        args = sdpa_args(call)
        plan = bsnd_plan(call) if choice.layout == "BSND" else None
        twins: dict[fx.Node, fx.Node] = {}
        q, k, v = args["query"], args["key"], args["value"]
        if plan is not None:
            twins.update({p: p.args[0] for p in plan.input_permutes})
            for node in plan.inputs:
                with self.graph.inserting_before(node):
                    twins[node] = self.twin(node, twins)
            q, k, v = twins[q], twins[k], twins[v]
        self.stack = call.meta.get("nn_module_stack")
        with self.graph.inserting_before(call):
            kernel_node, out = kernel.implementation(self.build, choice.call, Operands(q, k, v, choice.layout, args))
        kernel_node.meta[ATTENTION_LAYOUT_KEY] = choice.layout
        if "stack_trace" in call.meta:
            kernel_node.meta["stack_trace"] = call.meta["stack_trace"]
        if plan is None:
            call.replace_all_uses_with(out)
            dead = [call]
        else:
            twins[call] = out
            for node in plan.outputs:
                with self.graph.inserting_before(node):
                    twins[node] = self.twin(node, twins)
            for permute in plan.output_permutes:
                permute.replace_all_uses_with(twins[permute.args[0]])
            dead = [*plan.input_permutes, *plan.inputs, call, *plan.outputs, *plan.output_permutes]
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        for node in sorted(dead, key=order.__getitem__, reverse=True):
            if not node.users:
                self.graph.erase_node(node)
        self.stack = None
        return 0 if plan is None else plan.permutes_removed


def attention_lowering_pass(
    gm: fx.GraphModule, *, cfg: CompileConfig, registry: AttentionKernelRegistry | None = None
) -> PassResult:
    registry = registry or default_registry()
    register_lowered_targets()
    choices = attention_kernel_choices(gm, backend=cfg.attention_backend, env=attention_environment(cfg),
                                       registry=registry)
    refused = [c for c in choices if c.kernel is None]
    if refused:
        raise _refusal(cfg.attention_backend, refused, registry)
    lowering = _Lowering(gm) if any(registry[c.kernel].implementation for c in choices) else None
    counts: dict[str, int] = {}
    for node, choice in zip(sdpa_calls(gm), choices):
        kernel = registry[choice.kernel]
        counts[choice.kernel] = counts.get(choice.kernel, 0) + 1
        if kernel.implementation is None:
            continue
        removed = lowering.lower(node, choice, kernel)
        counts["lowered"] = counts.get("lowered", 0) + 1
        if removed:
            counts["permutes_removed"] = counts.get("permutes_removed", 0) + removed
    gm.meta[KERNELS_META_KEY] = [
        {"site": c.call.index, "module": c.call.module, **c.summary()} for c in choices
    ]
    return PassResult(gm, modified=bool(counts.get("lowered")), counts=counts, notes=_group_notes(choices))
