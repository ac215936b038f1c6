"""Which graph input is the diffusion timestep: found by what the graph does with it.

A DiT embeds its timestep sinusoidally (diffusers' `get_timestep_embedding`: t[:, None] * exp(-log(P)
* arange(D/2) / (D/2)), then sin and cos). The timestep input is therefore the floating-point input
with at most one dim (a scalar, or one value per batch element) from which a `sin`/`cos` is reached.
Inputs with more dims that reach `sin`/`cos` are position ids (RoPE tables), not timesteps. Guidance
(FLUX.1-dev) is embedded the same way but after the timestep (diffusers embeds the timestep first),
so of several candidates the one whose sinusoid comes first in graph order is the timestep.

The input's name plays no part: a timestep passed positionally or renamed is found all the same.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from npu_dit.passes.analysis.attention_ops import node_value
from npu_dit.passes.analysis.walk import first_reached

_SINUSOIDS = {torch.sin, torch.cos, torch.ops.aten.sin.default, torch.ops.aten.cos.default}


def _is_sinusoid(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("sin", "cos")
    return node.op == "call_function" and node.target in _SINUSOIDS


def timestep_input(gm: fx.GraphModule) -> int | None:
    """Position (among the placeholders) of the timestep input, or None when no input is embedded."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    everything = set(gm.graph.nodes)
    best: tuple[int, int] | None = None  # (graph position of its first sinusoid, placeholder position)
    for position, node in enumerate(placeholders):
        value = node_value(node)
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point or value.dim() > 1:
            continue
        if value.requires_grad:  # a parameter, not a call input
            continue
        hits = first_reached(node, forward=True, within=everything, stop=_is_sinusoid)
        if hits:
            first = min(order[h] for h in hits)
            if best is None or first < best[0]:
                best = (first, position)
    return None if best is None else best[1]
