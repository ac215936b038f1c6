"""What each rank sends: run the rewritten graph of rank r on meta tensors (shapes only, no data,
no process group) and record every collective's send buffer.

DeepSpeed-Ulysses moves 4·N·h/P elements per device per attention layer (Q, K, V and the output,
each N/P tokens x h channels); the report prints that figure next to the measured one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from npu_dit.passes.ulysses_plan import ShardingPlan
from npu_dit.runtime import collectives as C
from npu_dit.runtime import fp8_comm as P
from npu_dit.runtime.planes import tap_sends
from npu_dit.runtime.dist import ParallelContext
from npu_dit.runtime.executor import GraphExecutor

_KINDS = {
    C.seq_to_heads_start: "all_to_all (seq->heads)",
    C.seq_to_heads_qkv_start: "all_to_all (seq->heads, Q/K/V in one)",
    C.heads_to_seq_start: "all_to_all (heads->seq)",
    C.gather_heads_start: "all_gather (heads)",
    C.gather_seq_start: "all_gather (seq, as all_to_all)",
    C.tp_all_reduce: "all_reduce (TP, row-sharded linears)",
    C.tp_all_gather_last: "all_gather (TP, column + gather)",
    P.seq_to_heads_packed_start: "all_to_all (seq->heads, FP8 packed)",
    P.heads_to_seq_fp8_start: "all_to_all (heads->seq, FP8)",
}


class _MetaRun(fx.Interpreter):
    """Runs on meta tensors; collectives return correctly shaped meta tensors, waits pass through."""

    def __init__(self, gm: fx.GraphModule, world: int) -> None:
        super().__init__(gm)
        self.world = world
        self.sent: list[tuple[str, str, int, tuple[int, ...]]] = []  # (kind, module, bytes, shape)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in _KINDS:
            from npu_dit.passes.analysis.module_paths import module_path

            with tap_sends() as sends:  # the send buffer as the helper builds it (FP8 packing, scales included)
                out = super().call_function(target, args, kwargs)
            x = torch.stack(args[:3], 0) if target is C.seq_to_heads_qkv_start else args[0]
            x = x[0] if isinstance(x, (list, tuple)) else x
            nbytes = sum(n for _, n in sends) if sends else x.numel() * x.element_size()
            self.sent.append((_KINDS[target], module_path(self.current_node), nbytes, tuple(x.shape)))
            return out
        return super().call_function(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        self.current_node = n
        return super().run_node(n)


def tp_collectives(gm: fx.GraphModule, tp_plan: Any, inputs: list[Any]) -> dict[str, dict[str, int]]:
    """Tensor parallelism alone: rank 0's graph on meta tensors, its shards fed as the executor would."""
    from npu_dit.runtime.weights import WeightFeeder

    args = [a.to("meta") if isinstance(a, torch.Tensor) and a.device.type != "meta" and a.dim() > 0 else a for a in inputs]
    for index in gm.meta.get("npu_dit.scalar_inputs", ()):
        args[index] = args[index].item()
    args = WeightFeeder(tp_plan)(args)
    runner = _MetaRun(gm, tp_plan.world_size)
    with torch.no_grad():
        runner.run(*args)
    per_kind: dict[str, dict[str, int]] = {}
    for kind, _, nbytes, _ in runner.sent:
        entry = per_kind.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += nbytes
    return per_kind


def collective_report(gm: fx.GraphModule, plan: ShardingPlan, ctx: ParallelContext, inputs: list[Any], num_sites: int, hidden: int,
                      tp_plan: Any = None) -> dict[str, Any]:
    meta_inputs = [a.to("meta") if isinstance(a, torch.Tensor) and a.device.type != "meta" and a.dim() > 0 else a for a in inputs]
    executor = GraphExecutor(lambda *a: a, scalar_inputs=gm.meta.get("npu_dit.scalar_inputs", ()), plan=plan, ctx=ctx)
    args = list(meta_inputs)
    for index in executor.scalar_inputs:
        args[index] = args[index].item()
    if tp_plan is not None and tp_plan.shards:
        from npu_dit.runtime.weights import WeightFeeder

        args = WeightFeeder(tp_plan)(args)
    local_args, global_lengths = executor.shard_args(args)
    runner = _MetaRun(gm, ctx.world_size)
    with torch.no_grad():
        runner.run(*local_args)
    per_kind: dict[str, dict[str, int]] = {}
    for kind, _, nbytes, _ in runner.sent:
        entry = per_kind.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += nbytes
    a2a_bytes = sum(b for kind, _, b, _ in runner.sent if kind.startswith("all_to_all (seq->heads") or kind.startswith("all_to_all (heads->seq"))
    tokens = sum(global_lengths.values()) + sum(  # + replicated and patch-grid streams (no input carries a grid)
        s.example_length or 0 for s in plan.streams if not s.sharded or s.grid is not None
    )
    element = next((a.element_size() for a in local_args if isinstance(a, torch.Tensor) and a.is_floating_point()), 4)
    formula = 4 * tokens * hidden // ctx.world_size * element
    return {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "streams": plan.describe(),
        "collectives": per_kind,
        "bytes_per_step": sum(b for _, _, b, _ in runner.sent),
        "all_to_all_bytes_per_layer": a2a_bytes // max(num_sites, 1),
        "deepspeed_formula_bytes_per_layer": formula,
        "tokens": tokens,
        "hidden": hidden,
        "first_site": [(k, m, b, s) for k, m, b, s in runner.sent[:4]],
    }
