"""Share of parameters and FLOPs in each cache region (front / middle / back).

FLOPs count the matrix work: 2·M·N·K for each linear and 4·B·H·Sq·Sk·D for each attention call,
at the example sizes the graph was traced with.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from npu_dit.passes.analysis.attention_ops import LINEAR_TARGETS, attention_qkv, is_attention_call, node_value
from npu_dit.passes.analysis.fake_prop import shape_hint
from npu_dit.plans import CachePlan


def _hint(size: Any) -> int:
    if isinstance(size, torch.SymInt):
        return int(size.node.hint) if size.node.hint is not None else shape_hint(size.node.shape_env, size.node.expr)
    return int(size)


def _numel(value: torch.Tensor) -> int:
    total = 1
    for s in value.shape:
        total *= _hint(s)
    return total


def node_flops(node: fx.Node) -> int:
    if node.op != "call_function":
        return 0
    if node.target in LINEAR_TARGETS:
        out, weight = node_value(node), node_value(node.args[1])
        return 2 * _numel(out) * _hint(weight.shape[1])
    if is_attention_call(node):
        q_node, k_node, _ = attention_qkv(node)
        q, k = node_value(q_node), node_value(k_node)
        batch_heads = _numel(q) // (_hint(q.shape[-2]) * _hint(q.shape[-1]))
        return 4 * batch_heads * _hint(q.shape[-2]) * _hint(k.shape[-2]) * _hint(q.shape[-1])
    return 0


def region_costs(plan: CachePlan, gm: fx.GraphModule) -> list[dict[str, Any]]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    rows = []
    for region in plan.regions:
        params = 0
        for kind, index in region.inputs:
            if kind == "arg":
                value = node_value(placeholders[index])
                if isinstance(value, torch.nn.Parameter):
                    params += _numel(value) * value.element_size()
        flops = sum(node_flops(n) for n in region.gm.graph.nodes)
        rows.append({"region": region.name, "blocks": len(region.blocks), "nodes": region.nodes,
                     "parameter_bytes": params, "flops": flops})
    total_params = sum(r["parameter_bytes"] for r in rows) or 1
    total_flops = sum(r["flops"] for r in rows) or 1
    for r in rows:
        r["parameter_share"] = r["parameter_bytes"] / total_params
        r["flop_share"] = r["flops"] / total_flops
    return rows
