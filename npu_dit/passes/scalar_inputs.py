"""Scalar inputs: take Python numbers instead of 0-d tensors that the graph immediately `.item()`s.

Under `dynamic=True` Dynamo passes float attributes of modules (norm eps, RoPE theta, dropout p) as
0-d CPU tensors and reads them with `.item()` inside the graph:

    before:   eps = placeholder()            # tensor(1e-06)
              e = eps.item()
              y = layer_norm(x, (d,), None, None, e)

    after:    eps = placeholder()            # 1e-06, a Python float the executor passes
              y = layer_norm(x, (d,), None, None, eps)

The executor calls `.item()` on those arguments once per call, outside the graph. The graph then has
no `.item()` (no host sync inside compiled regions) and can be traced again by Dynamo — which the
rewritten, re-compiled graphs of the Ulysses and cache passes need. Numerics are unchanged (the
same float reaches the same op).
Pipeline position: first, before any pass that needs the graph re-traceable.
Postcondition: `gm.meta["npu_dit.scalar_inputs"]` lists the placeholder positions to `.item()`.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from npu_dit.passes.analysis.attention_ops import node_value
from npu_dit.passes.infra import PassResult

SCALAR_INPUTS_KEY = "npu_dit.scalar_inputs"


def _is_item(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "item"


def scalar_inputs_pass(gm: fx.GraphModule) -> PassResult:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    hoisted = []
    for position, node in enumerate(placeholders):
        value = node_value(node)
        if not isinstance(value, torch.Tensor) or value.dim() != 0 or isinstance(value, torch.nn.Parameter):
            continue
        if not node.users or not all(_is_item(user) for user in node.users):
            continue
        items = list(node.users)
        node.meta["val"] = node_value(items[0])
        for item in items:
            item.replace_all_uses_with(node)
            gm.graph.erase_node(item)
        hoisted.append(position)
    gm.meta[SCALAR_INPUTS_KEY] = hoisted
    return PassResult(gm, modified=bool(hoisted), counts={"scalar_inputs": len(hoisted)} if hoisted else {})
