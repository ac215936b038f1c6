"""Attention sites: each attention call with its Q/K/V projections, QK-norm/RoPE chain and output
projection.

For a call `attn(q, k, v)` we walk backwards from q, k and v inside the call's transformer block,
stopping at linear ops (the projections) and at nodes outside the block (RoPE tables, masks). The
nodes between the projections and the call form the chain (head split, QK-norm, RoPE, the
text/image concatenation of joint attention, the permute to BNSD). Walking forwards from the call to
the next linear ops gives the output projection(s).

    FLUX double block (joint):   to_q(img), add_q_proj(txt) -> unflatten -> rms_norm -> cat -> rope -> permute -> sdpa
    FLUX single block:           to_q(joint)                -> unflatten -> rms_norm -> rope -> permute -> sdpa
    Qwen-Image block (joint):    to_q(img), add_q_proj(txt) -> unflatten -> RMSNorm -> rope -> cat -> permute -> sdpa
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from npu_dit.passes.analysis._cache import cached_analysis
from npu_dit.passes.analysis.attention_ops import (
    attention_layout,
    attention_mask,
    attention_qkv,
    is_attention_call,
    is_linear,
    is_norm,
    node_value,
)
from npu_dit.passes.analysis.blocks import block_index_of, transformer_blocks
from npu_dit.passes.analysis.module_paths import module_path, module_stack
from npu_dit.passes.analysis.walk import first_reached


@dataclasses.dataclass(frozen=True)
class ProjectionChain:
    projections: tuple[fx.Node, ...]  # linear nodes, in the order their tokens appear in the sequence
    chain: frozenset[fx.Node]  # nodes between the projections and the attention call
    norm_modules: tuple[str, ...]  # module paths of QK-norms on the chain
    rope_nodes: tuple[fx.Node, ...]  # chain nodes that combine the chain with a side table (RoPE)
    side_inputs: tuple[fx.Node, ...]  # tensors entering the chain from outside it (tables, weights)


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    index: int
    node: fx.Node
    block: int | None
    block_path: str
    block_kind: str
    module: str  # attention module path, e.g. "transformer_blocks.0.attn"
    kind: str  # "joint" (separately projected streams concatenated) or "single"
    q: ProjectionChain
    k: ProjectionChain
    v: ProjectionChain
    out_projections: tuple[fx.Node, ...]
    num_heads: int
    head_dim: int
    mask: fx.Node | None

    def summary(self) -> dict[str, object]:
        return {
            "index": self.index,
            "module": self.module,
            "block": self.block_path,
            "block_kind": self.block_kind,
            "kind": self.kind,
            "heads": self.num_heads,
            "head_dim": self.head_dim,
            "q_proj": [module_path(n) for n in self.q.projections],
            "k_proj": [module_path(n) for n in self.k.projections],
            "v_proj": [module_path(n) for n in self.v.projections],
            "qk_norm": list(self.q.norm_modules + self.k.norm_modules),
            "rope": bool(self.q.rope_nodes or self.k.rope_nodes),
            "out_proj": [module_path(n) for n in self.out_projections],
            "mask": self.mask is not None,
        }


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if isinstance(node_value(n), torch.Tensor)]


def _is_parameter(node: fx.Node, params: frozenset[fx.Node]) -> bool:
    return node in params


def _walk_projection_chain(
    start: fx.Node, in_block: set[fx.Node], params: frozenset[fx.Node]
) -> ProjectionChain:
    visited: set[fx.Node] = set()
    projections: list[fx.Node] = []
    stack = [start]
    while stack:
        node = stack.pop()
        if node in visited:
            continue
        visited.add(node)
        if is_linear(node):
            projections.append(node)
            continue
        for inp in _tensor_inputs(node):
            if inp in in_block and not _is_parameter(inp, params):
                stack.append(inp)
    # the chain is what lies downstream of a projection among the visited nodes
    chain: set[fx.Node] = set()
    frontier = list(projections)
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in visited and user not in chain and not is_linear(user):
                chain.add(user)
                frontier.append(user)
    side_inputs = []
    rope_nodes = []
    for node in chain:
        sides = [i for i in _tensor_inputs(node) if i not in chain and i not in projections]
        non_param = [i for i in sides if not _is_parameter(i, params)]
        if non_param and not is_norm(node):
            rope_nodes.append(node)
        side_inputs.extend(sides)
    norm_modules: set[str] = set()
    for node in chain:
        stack = module_stack(node)
        if stack and (is_norm(node) or "norm" in stack[-1][1].lower()):
            norm_modules.add(stack[-1][0])
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    ordered_projections = _sequence_order(projections, chain, order)
    return ProjectionChain(
        projections=tuple(ordered_projections),
        chain=frozenset(chain),
        norm_modules=tuple(sorted(norm_modules)),
        rope_nodes=tuple(sorted(rope_nodes, key=order.__getitem__)),
        side_inputs=tuple(sorted(set(side_inputs), key=order.__getitem__)),
    )


def _sequence_order(projections: list[fx.Node], chain: set[fx.Node], order: dict[fx.Node, int]) -> list[fx.Node]:
    """Order projections by where their tokens sit in the concatenated sequence (cat argument order)."""
    if len(projections) <= 1:
        return projections
    descendants: dict[fx.Node, set[fx.Node]] = {}
    for proj in projections:
        seen: set[fx.Node] = {proj}
        frontier = [proj]
        while frontier:
            node = frontier.pop()
            for user in node.users:
                if user in chain and user not in seen:
                    seen.add(user)
                    frontier.append(user)
        descendants[proj] = seen
    for node in sorted(chain, key=order.__getitem__):
        if node.op == "call_function" and node.target is torch.cat and isinstance(node.args[0], (list, tuple)):
            position = {}
            for slot, piece in enumerate(node.args[0]):
                for proj in projections:
                    if isinstance(piece, fx.Node) and piece in descendants[proj]:
                        position.setdefault(proj, slot)
            if len(position) == len(projections):
                return sorted(projections, key=position.__getitem__)
    return sorted(projections, key=order.__getitem__)


def _out_projections(call: fx.Node, in_block: set[fx.Node]) -> tuple[fx.Node, ...]:
    found = first_reached(call, forward=True, within=in_block, stop=is_linear)
    order = {n: i for i, n in enumerate(call.graph.nodes)}
    return tuple(sorted(found, key=order.__getitem__))


@cached_analysis
def attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    blocks = transformer_blocks(gm)
    block_of = block_index_of(gm)
    members: dict[int, set[fx.Node]] = {}
    for node, index in block_of.items():
        members.setdefault(index, set()).add(node)
    params = frozenset(parameter_placeholders(gm))
    sites = []
    for node in gm.graph.nodes:
        if not is_attention_call(node):
            continue
        block = block_of.get(node)
        if block is not None:
            region = members[block]
        else:  # attention outside any block: stay within the same innermost module
            path = module_path(node)
            region = {n for n in gm.graph.nodes if module_path(n).startswith(path)}
        q, k, v = attention_qkv(node)
        q_chain = _walk_projection_chain(q, region, params)
        k_chain = _walk_projection_chain(k, region, params)
        v_chain = _walk_projection_chain(v, region, params)
        q_shape = node_value(q).shape
        head_axis = attention_layout(node).index("N") - 4  # -3 in BNSD, -2 in BSND
        mask = attention_mask(node)
        sites.append(
            AttentionSite(
                index=len(sites),
                node=node,
                block=block,
                block_path=blocks[block].path if block is not None else "",
                block_kind=blocks[block].kind if block is not None else "",
                module=module_path(node),
                kind="joint" if len(q_chain.projections) > 1 else "single",
                q=q_chain,
                k=k_chain,
                v=v_chain,
                out_projections=_out_projections(node, region),
                num_heads=int(q_shape[head_axis]),
                head_dim=int(q_shape[-1]),
                mask=mask if isinstance(mask, fx.Node) else None,
            )
        )
    return sites


def parameter_placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    """Placeholders that Dynamo lifted from module parameters and buffers."""
    result = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node_value(node)
        if isinstance(value, torch.nn.Parameter):
            result.append(node)
            continue
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = getattr(source, "name", "")
        name = name() if callable(name) else name
        if "_parameters" in name or "_buffers" in name:
            result.append(node)
    return result
