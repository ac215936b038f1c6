"""Sync Ulysses: Q, K and V of one attention site in one all-to-all.

Before (the Ulysses pass, one site; the three exchanges run one after the other):

    qh = seq_to_heads_wait(seq_to_heads_start(q, s, h, lens, P, g), s, h)
    kh = seq_to_heads_wait(seq_to_heads_start(k, s, h, lens, P, g), s, h)
    vh = seq_to_heads_wait(seq_to_heads_start(v, s, h, lens, P, g), s, h)
    o  = attention(qh, kh, vh)

After:

    qkv = seq_to_heads_qkv_wait(seq_to_heads_qkv_start(q, k, v, s, h, lens, P, g), s, h)
    o   = attention(qkv[0], qkv[1], qkv[2])

One message of three times the size instead of three: a third of the per-message latency, and on
Gloo/NCCL/HCCL one launch. The data each rank receives is the same, so the attention's inputs are the
same values (bitwise). Async Ulysses keeps its per-projection all-to-alls (each overlaps the next
projection), so this pass is only in the pipeline when `async_ulysses` is off.

Which starts belong together: the three `seq_to_heads_start` calls inserted for one attention call
(the same module, the same dims, split sizes, group and dtype, inputs of the same shape). A site whose
Q/K/V hold several runs (a replicated text stream beside sharded image tokens: six or more starts), or
whose exchanged values are used before the last of the three is issued, is left as it is.
Pipeline position: after attention lowering (which sees the unfused exchanges as layout-transparent
ops) and before the cache regions are cut.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from npu_dit.passes.analysis.attention_ops import graph_fake_mode, node_value
from npu_dit.passes.analysis.module_paths import module_path
from npu_dit.passes.infra import PassResult
from npu_dit.runtime import collectives as C


def _site_key(start: fx.Node) -> tuple:
    x = node_value(start.args[0])
    lengths = start.args[3]
    lengths = lengths if isinstance(lengths, fx.Node) else tuple(lengths)
    return (module_path(start), start.args[1], start.args[2], lengths, start.args[4], start.args[5],
            x.dtype, tuple(str(d) for d in x.shape))


def _wait_of(start: fx.Node) -> fx.Node | None:
    users = list(start.users)
    if len(users) == 1 and users[0].target is C.seq_to_heads_wait:
        return users[0]
    return None


def fuse_qkv_pass(gm: fx.GraphModule) -> PassResult:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is C.seq_to_heads_start:
            sites.setdefault(_site_key(node), []).append(node)
    fused = 0
    for starts in sites.values():
        if len(starts) != 3:
            continue
        waits = [_wait_of(s) for s in starts]
        if any(w is None for w in waits):
            continue
        last = max(starts, key=order.get)
        # every use of the exchanged values must come after the last start (sync Ulysses: attention)
        if any(order[u] < order[last] for w in waits for u in w.users):
            continue
        # q, k, v in the order the attention takes them (the Ulysses pass inserts them so)
        starts.sort(key=order.get)
        waits = [_wait_of(s) for s in starts]
        seq_dim, head_dim, lengths, world, group = starts[0].args[1:6]
        with gm.graph.inserting_after(last):
            start = gm.graph.call_function(
                C.seq_to_heads_qkv_start, (*(s.args[0] for s in starts), seq_dim, head_dim, lengths, world, group))
        with gm.graph.inserting_after(start):
            wait = gm.graph.call_function(C.seq_to_heads_qkv_wait, (start, seq_dim, head_dim))
        values = [node_value(w) for w in waits]
        with graph_fake_mode(gm):
            received = torch.stack([node_value(s) for s in starts], 1)  # [S_full, 3, H/world, *rest]
        start.meta.update(nn_module_stack=starts[0].meta.get("nn_module_stack"), val=received)
        wait.meta.update(nn_module_stack=starts[0].meta.get("nn_module_stack"), val=tuple(values))
        previous = wait
        for i, old in enumerate(waits):
            with gm.graph.inserting_after(previous):
                item = gm.graph.call_function(operator.getitem, (wait, i))
            item.meta.update(nn_module_stack=old.meta.get("nn_module_stack"), val=values[i])
            old.replace_all_uses_with(item)
            previous = item
        for old_wait, old_start in zip(waits, starts):
            gm.graph.erase_node(old_wait)
            gm.graph.erase_node(old_start)
        fused += 1
    if not fused:
        return PassResult(gm, modified=False)
    return PassResult(gm, modified=True, counts={"fused_qkv_all_to_all": fused})
