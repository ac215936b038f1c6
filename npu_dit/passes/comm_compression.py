"""Compressed Ulysses traffic (`comm_dtype="float8_e4m3fn"`): Q, V and the attention output through the
all-to-alls in FP8, a scale per tensor and head; K keeps the compute dtype (as cache-dit does: the
softmax logits are the most sensitive to K's error).

Before (sync Ulysses after fuse_qkv; async has one start per operand):

    qkv = seq_to_heads_qkv_wait(seq_to_heads_qkv_start(q, k, v, s, h, lens, P, g), s, h)
    o   = attention(qkv[0], qkv[1], qkv[2])
    out = heads_to_seq_wait(heads_to_seq_start(o, s, h, lens, P, r, g), s, h, P)

After:

    qkv = seq_to_heads_packed_wait(seq_to_heads_packed_start((q, k, v), (True, False, True), s, h, lens, P, g),
                                   (True, False, True), s, h, lens, dtype)
    o   = attention(qkv[0], qkv[1], qkv[2])
    out = heads_to_seq_fp8_wait(heads_to_seq_fp8_start(o, s, h, lens, P, r, g), s, h, P, dtype)

Which operand an exchange carries is read from the graph: the exchanged value is followed forward
(through layout ops, a few nodes) to the attention call whose query, key or value it becomes. An
exchange that reaches no attention, or feeds K (or K and another operand), travels as before; so does
one whose dtype is not a 16/32-bit float or whose last dim (the head size) is not a multiple of 8
(the packed message puts each head's scales in its slot). Numerics change (FP8 has a 3-bit
mantissa): tests hold the result within a stated bound of the uncompressed run.
Pipeline position: last before cache_regions — after fuse_qkv (it packs the fused message) and after
the async scheduling and attention lowering (it replaces each start and wait where they stand).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from npu_dit.passes.analysis.attention_ops import attention_qkv, graph_fake_mode, is_attention_call, node_value
from npu_dit.passes.infra import PassResult
from npu_dit.runtime import collectives as C
from npu_dit.runtime import fp8_comm as P

COMPRESSED_ROLES = {"query", "value"}
_WALK_LIMIT = 64  # nodes followed from an exchange to its attention call (layout ops only, in practice)


def _roles(value: fx.Node) -> set[str]:
    """Which attention operands (query/key/value) `value` becomes; {"?"} when it reaches no attention
    call within the walk limit or also flows elsewhere."""
    roles: set[str] = set()
    seen: set[fx.Node] = set()
    stack = [value]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user.op == "output":
                return {"?"}
            if is_attention_call(user):
                for name, operand in zip(("query", "key", "value"), attention_qkv(user)):
                    if operand is node:
                        roles.add(name)
                continue
            if user not in seen:
                seen.add(user)
                if len(seen) > _WALK_LIMIT:
                    return {"?"}
                stack.append(user)
    return roles or {"?"}


def _compressible(x: object) -> bool:
    return (isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and isinstance(x.shape[-1], int) and x.shape[-1] % 8 == 0)


def _empty(gm: fx.GraphModule, sizes: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    fake_mode = graph_fake_mode(gm)
    # a shape rule, not a fake run of the helper: no guard may reach Dynamo's ShapeEnv (they would
    # become guards of the user's frame), and fake-running a collective costs as much as tracing it
    with fake_mode, fake_mode.shape_env.suppress_guards():
        return torch.empty(sizes, dtype=dtype, device=device)


def _packed_bytes_shape(xs: list[torch.Tensor], flags: tuple[bool, ...], seq_dim: int, head_dim: int,
                        recv_lengths: list, world: int) -> list:
    """`fp8_comm.seq_to_heads_packed_start`'s output shape: [sum(recv) + W, H/W, *rest[:-1], bytes]."""
    x = xs[0]
    ndim = x.dim()
    rest = [x.shape[d] for d in range(ndim) if d not in (head_dim % ndim, seq_dim % ndim)]
    width = sum(x.shape[-1] * (1 if fp8 else x.element_size()) for fp8 in flags)
    return [sum(recv_lengths) + world, x.shape[head_dim] // world, *rest[:-1], width]


def _replace(gm: fx.GraphModule, start: fx.Node, wait: fx.Node, new_start: tuple, new_wait: tuple,
             start_shape: list, outputs: list[fx.Node]) -> None:
    """Insert the new start where the old one stands and the new wait where the old wait stands (the
    async schedule is kept); `outputs` (the old wait, or its getitems) take the new wait's items."""
    stack = start.meta.get("nn_module_stack")
    device = node_value(start).device
    with gm.graph.inserting_before(start):
        s = gm.graph.call_function(*new_start)
    s.meta.update(nn_module_stack=stack, val=_empty(gm, start_shape, torch.uint8, device))
    target, args = new_wait
    with gm.graph.inserting_before(wait):
        w = gm.graph.call_function(target, (s, *args[1:]))
    values = [node_value(n) for n in outputs]
    w.meta.update(nn_module_stack=stack, val=values[0] if target is P.heads_to_seq_fp8_wait else tuple(values))
    if target is P.heads_to_seq_fp8_wait:
        wait.replace_all_uses_with(w)
    else:
        for index, old in enumerate(outputs):
            with gm.graph.inserting_before(wait):
                item = gm.graph.call_function(operator.getitem, (w, index))
            item.meta.update(nn_module_stack=old.meta.get("nn_module_stack"), val=values[index])
            old.replace_all_uses_with(item)
            if old is not wait:
                gm.graph.erase_node(old)
    gm.graph.erase_node(wait)
    gm.graph.erase_node(start)


def comm_compression_pass(gm: fx.GraphModule, *, comm_dtype: str) -> PassResult:
    assert comm_dtype in P.COMM_DTYPES, comm_dtype
    counts = {"fp8_exchanges": 0, "fp8_operands": 0, "kept_exchanges": 0}
    notes: list[str] = []
    for start in [n for n in gm.graph.nodes if n.op == "call_function"]:
        if start.target is C.seq_to_heads_start:
            wait = next(iter(start.users))
            x = node_value(start.args[0])
            if _roles(wait) <= COMPRESSED_ROLES and _compressible(x):
                x_node, seq_dim, head_dim, lengths, world, group = start.args
                flags = (True,)
                shape = _packed_bytes_shape([x], flags, seq_dim, head_dim, node_value(lengths), world)
                _replace(gm, start, wait,
                         (P.seq_to_heads_packed_start, ((x_node,), flags, seq_dim, head_dim, lengths, world, group)),
                         (P.seq_to_heads_packed_wait, (None, flags, seq_dim, head_dim, lengths, x.dtype)), shape, [wait])
                counts["fp8_exchanges"] += 1
                counts["fp8_operands"] += 1
            else:
                counts["kept_exchanges"] += 1
        elif start.target is C.seq_to_heads_qkv_start:
            wait = next(iter(start.users))
            items = sorted(wait.users, key=lambda n: n.args[1])
            if [n.target for n in items] != [operator.getitem] * 3 or [n.args[1] for n in items] != [0, 1, 2]:
                counts["kept_exchanges"] += 1
                continue
            values = [node_value(a) for a in start.args[:3]]
            flags = tuple(_roles(item) <= COMPRESSED_ROLES and _compressible(v) for item, v in zip(items, values))
            if not any(flags) or len({v.dtype for v in values}) != 1:
                counts["kept_exchanges"] += 1
                continue
            q, k, v, seq_dim, head_dim, lengths, world, group = start.args
            shape = _packed_bytes_shape(values, flags, seq_dim, head_dim, node_value(lengths), world)
            _replace(gm, start, wait,
                     (P.seq_to_heads_packed_start, ((q, k, v), flags, seq_dim, head_dim, lengths, world, group)),
                     (P.seq_to_heads_packed_wait, (None, flags, seq_dim, head_dim, lengths, values[0].dtype)), shape,
                     items)
            counts["fp8_exchanges"] += 1
            counts["fp8_operands"] += sum(flags)
        elif start.target is C.heads_to_seq_start:
            wait = next(iter(start.users))
            y = node_value(start.args[0])
            if _compressible(y):
                _, seq_dim, head_dim, lengths, world, rank, _ = start.args
                heads, _, *rest = [y.shape[head_dim % y.dim()], y.shape[seq_dim % y.dim()]] + [
                    n for d, n in enumerate(y.shape) if d not in (head_dim % y.dim(), seq_dim % y.dim())]
                shape = [(node_value(lengths)[rank] + 1) * world, heads, *rest]
                _replace(gm, start, wait, (P.heads_to_seq_fp8_start, start.args),
                         (P.heads_to_seq_fp8_wait, (None, *wait.args[1:], y.dtype)), shape, [wait])
                counts["fp8_exchanges"] += 1
                counts["fp8_operands"] += 1
            else:
                counts["kept_exchanges"] += 1
    if not counts["fp8_exchanges"]:
        notes.append(f"comm_dtype={comm_dtype}: no Ulysses exchange could be compressed")
        return PassResult(gm, modified=False, counts=counts, notes=notes)
    return PassResult(gm, modified=True, counts=counts, notes=notes)
