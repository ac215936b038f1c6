"""Async Ulysses: schedule each all-to-all as early as its producer allows and each wait at first use.

Before (Ulysses' output, one attention site; each a2a waits right after it starts):

    q = to_q(x) ... rope ... ; a2a(q) ; wait ; k = to_k(x) ... ; a2a(k) ; wait ; v = to_v(x) ; a2a(v) ; wait
    o = attention(q, k, v) ; a2a(o) ; wait ; mlp = proj_mlp(x) ; proj_out(cat(o, mlp))

After:

    v = to_v(x) ; start(v)
    q = to_q(x) ... norm, rope ; start(q)          <- V's exchange overlaps Q's projection, norm and RoPE
    k = to_k(x) ... norm, rope ; start(k)          <- Q's overlaps K's
    wait(q), wait(k), wait(v) ; o = attention(q, k, v) ; start(o)
    mlp = proj_mlp(x)                              <- the output exchange overlaps the MLP branch
    wait(o) ; proj_out(cat(o, mlp))

The pass only moves nodes inside each transformer block (topological order is kept, so the numerics
are those of the Ulysses graph, bitwise). Functional collectives return at once and `wait_tensor`
blocks, so on Gloo/NCCL/HCCL the transfer runs while the moved compute executes.
Pipeline position: right after `ulysses`.
"""

from __future__ import annotations

import torch.fx as fx

from npu_dit.passes.analysis.attention_ops import is_sdpa
from npu_dit.passes.analysis.blocks import transformer_blocks
from npu_dit.passes.analysis.walk import first_reached
from npu_dit.passes.infra import PassResult
from npu_dit.runtime import collectives as C

STARTS = set(C.COLLECTIVE_STARTS)
WAITS = set(C.COLLECTIVE_WAITS)


def _is_start(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in STARTS


def _starts_feeding(node: fx.Node, region: set[fx.Node]) -> list[fx.Node]:
    """Collective starts among `node`'s ancestors inside the region (not crossing other starts)."""
    return first_reached(node, forward=False, within=region, stop=_is_start)


def _descendants(node: fx.Node, region: set[fx.Node]) -> set[fx.Node]:
    result: set[fx.Node] = set()
    stack = [node]
    while stack:
        for user in stack.pop().users:
            if user in region and user not in result:
                result.add(user)
                stack.append(user)
    return result


def _operand_of(start: fx.Node, attention: fx.Node) -> str:
    """Which attention operand a start node feeds: 'v', 'q', 'k' or 'mask' (its issue order)."""
    names = ("query", "key", "value")
    for position, arg in enumerate(attention.args[:3]):
        if start in _ancestors_upto(arg, start):
            return names[position][0]
    return "mask"


def _ancestors_upto(node: fx.Node, target: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is target:
            break
        stack.extend(n.all_input_nodes)
    return seen


ISSUE_ORDER = {"v": 0, "q": 1, "k": 2, "mask": 3}


def async_ulysses_pass(gm: fx.GraphModule) -> PassResult:
    graph = gm.graph
    moved = 0
    overlapped = 0
    notes: list[str] = []
    for block in transformer_blocks(gm):
        nodes = list(graph.nodes)
        region_list = nodes[block.first : block.last + 1]
        region = set(region_list)
        sites = [n for n in region_list if is_sdpa(n) and _starts_feeding(n, region)]
        if not sites:
            continue
        order: list[fx.Node] = []
        placed: set[fx.Node] = set()

        def place(n: fx.Node) -> None:
            stack = [(n, False)]
            while stack:
                current, expanded = stack.pop()
                if current in placed or current not in region:
                    continue
                if expanded:
                    placed.add(current)
                    order.append(current)
                    continue
                stack.append((current, True))
                for inp in reversed(current.all_input_nodes):
                    if inp not in placed and inp in region:
                        stack.append((inp, False))

        position = {n: i for i, n in enumerate(region_list)}
        for attention in sites:
            # every rank must issue its collectives in the same order: sort deterministically
            starts = sorted(
                _starts_feeding(attention, region),
                key=lambda s: (ISSUE_ORDER[_operand_of(s, attention)], position[s]),
            )
            for start in starts:
                place(start)
            place(attention)
            out_starts = sorted((u for u in _descendants(attention, region) if _is_start(u)), key=position.__getitem__)
            for start in out_starts:
                place(start)
            downstream = _descendants(attention, region)
            for n in region_list:  # independent compute goes between the output exchange and its wait
                if n not in downstream and not (n.op == "call_function" and n.target in WAITS):
                    place(n)
            overlapped += len(starts) + len(out_starts)
        for n in region_list:
            place(n)
        assert len(order) == len(region_list), "async scheduling lost nodes"
        if order != region_list:
            anchor = region_list[0].prev
            for n in order:
                anchor.append(n)
                anchor = n
            moved += sum(1 for a, b in zip(order, region_list) if a is not b)
        positions = {n: i for i, n in enumerate(order)}
        for n in order:
            if _is_start(n):
                wait = next(iter(n.users))
                between = [m for m in order[positions[n] + 1 : positions[wait]] if m.op == "call_function" and m.target not in STARTS]
                notes.append(f"{block.path}: {n.target.__name__} overlaps {len(between)} nodes")
    return PassResult(gm, modified=moved > 0, counts={"overlapped_collectives": overlapped, "moved_nodes": moved}, notes=notes)
