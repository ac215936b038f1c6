"""Transformer-block boundaries and block order.

A transformer block is the outermost element of a ModuleList (`transformer_blocks.7`) whose nodes
contain an attention call. FLUX's 19 double-stream and 38 single-stream blocks come out as one list
of 57 in execution order, which is how cache-dit counts blocks for Fn/Bn.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from npu_dit.passes.analysis._cache import cached_analysis
from npu_dit.passes.analysis.attention_ops import is_attention_call
from npu_dit.passes.analysis.module_paths import indexed_ancestor


@dataclasses.dataclass(frozen=True)
class Block:
    index: int  # position in execution order
    path: str  # e.g. "single_transformer_blocks.3"
    kind: str  # module class name, e.g. "FluxSingleTransformerBlock"
    first: int  # index of the block's first node in graph order
    last: int  # index of its last node
    num_nodes: int
    contiguous: bool  # no node of another block lies between first and last


@cached_analysis
def transformer_blocks(gm: fx.GraphModule) -> list[Block]:
    nodes = list(gm.graph.nodes)
    # inputs (parameters carry their module's stack) are not part of any block's computation
    owner: list[tuple[str, str] | None] = [
        None if n.op in ("placeholder", "get_attr", "output") else indexed_ancestor(n) for n in nodes
    ]
    with_attention = {owner[i][0] for i, n in enumerate(nodes) if owner[i] and is_attention_call(n)}
    spans: dict[str, list[int]] = {}
    kinds: dict[str, str] = {}
    for i, entry in enumerate(owner):
        if entry and entry[0] in with_attention:
            spans.setdefault(entry[0], []).append(i)
            kinds[entry[0]] = entry[1]
    ordered = sorted(spans.items(), key=lambda item: item[1][0])
    blocks = []
    for index, (path, positions) in enumerate(ordered):
        first, last = positions[0], positions[-1]
        others = any(
            owner[i] is not None and owner[i][0] != path and owner[i][0] in with_attention
            for i in range(first, last + 1)
        )
        blocks.append(Block(index, path, kinds[path], first, last, len(positions), not others))
    return blocks


def block_index_of(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Map every node that belongs to a transformer block to that block's index."""
    by_path = {b.path: b.index for b in transformer_blocks(gm)}
    result = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        entry = indexed_ancestor(node)
        if entry and entry[0] in by_path:
            result[node] = by_path[entry[0]]
    return result
