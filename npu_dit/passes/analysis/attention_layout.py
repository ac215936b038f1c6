"""Can an attention call take and give [B, S, N, D] (BSND) tensors without a transpose?

Dynamo's graphs build q/k/v in [B, S, N, D] and permute them to SDPA's [B, N, S, D] (BNSD) right before
the call; the output is permuted back right after. A kernel that reads BSND (torch_npu's fused attention
with `input_layout="BSND"`) needs neither permute. Under Ulysses the permutes sit further away, with the
all-to-all between them and the call:

    q_BNSD = permute(q_BSND, 0, 2, 1, 3)
    qh = seq_to_heads_wait(seq_to_heads_start(pad_heads(q_BNSD, head_dim=1), seq_dim=2, head_dim=1), 2, 1)
    o = sdpa(qh, kh, vh)
    o_BSND = permute(strip_heads(heads_to_seq_wait(heads_to_seq_start(o, 2, 1), 2, 1), 1), 0, 2, 1, 3)

Every op on those paths is *layout-transparent*: it takes its sequence/head axes as arguments
(runtime/collectives.py), or is a split/cat along one of them. The same program in BSND is the same ops
with axes 1 and 2 swapped in their arguments, fed by `q_BSND` and ending at `o_BSND`. This analysis
finds those paths (`BsndPlan`); the lowering pass re-emits them. It refuses (returns None) when a path
holds an op it does not know, or a node that also feeds something outside the path (re-emitting it
would duplicate the work, an all-to-all say).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from npu_dit.passes.analysis.attention_ops import attention_qkv, node_value
from npu_dit.runtime import collectives as C

# layout-transparent ops -> positions of their axis arguments (all axes of the 4-D BNSD tensor)
AXIS_ARGS: dict[object, tuple[int, ...]] = {
    C.pad_heads: (1,),
    C.strip_heads: (1,),
    C.local_heads: (1,),
    C.seq_to_heads_start: (1, 2),
    C.seq_to_heads_wait: (1, 2),
    C.heads_to_seq_start: (1, 2),
    C.heads_to_seq_wait: (1, 2),
    C.gather_heads_start: (1,),
    C.gather_heads_wait: (1,),
    torch.split: (2,),
    torch.cat: (1,),
}
_PERMUTES = {"permute", torch.permute, torch.ops.aten.permute.default}
_TRANSPOSES = {"transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes, torch.swapdims,
               torch.ops.aten.transpose.int}


def swap_axis(dim: int) -> int:
    """An axis of a BNSD tensor -> the same axis of its BSND twin (N and S trade places)."""
    dim %= 4
    return {1: 2, 2: 1}.get(dim, dim)


def is_swap12(node: fx.Node) -> bool:
    """`permute(x, 0, 2, 1, 3)` or `transpose(x, 1, 2)` of a 4-D tensor: BSND <-> BNSD."""
    if node.op not in ("call_function", "call_method") or not node.args:
        return False
    value = node_value(node)
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        return False
    rest = node.args[1:] or tuple(v for k, v in node.kwargs.items() if k in ("dims", "dim0", "dim1"))
    if node.target in _PERMUTES:
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        return [d % 4 for d in dims if isinstance(d, int)] == [0, 2, 1, 3]
    if node.target in _TRANSPOSES and len(rest) == 2 and all(isinstance(d, int) for d in rest):
        return {d % 4 for d in rest} == {1, 2}
    return False


def _layout_inputs(node: fx.Node) -> list[fx.Node]:
    """The arguments of a layout-transparent node that carry the BNSD layout."""
    if node.target is operator.getitem:
        return [node.args[0]]
    first = node.args[0]
    return [n for n in first if isinstance(n, fx.Node)] if node.target is torch.cat else [first]


def is_transparent(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:  # a piece of a split
        return isinstance(node.args[0], fx.Node) and node.args[0].target is torch.split
    return node.target in AXIS_ARGS and bool(node.args)


@dataclasses.dataclass(frozen=True)
class BsndPlan:
    """What the lowering re-emits in BSND for one attention call (node sets in graph order)."""

    inputs: tuple[fx.Node, ...]  # transparent nodes between the input permutes and the call
    input_permutes: tuple[fx.Node, ...]  # permute(x_BSND) nodes: their input is the BSND value
    outputs: tuple[fx.Node, ...]  # transparent nodes between the call and the output permutes
    output_permutes: tuple[fx.Node, ...]  # permutes back to BSND: replaced by the re-emitted value

    @property
    def permutes_removed(self) -> int:
        return len(self.input_permutes) + len(self.output_permutes)


def _backward(start: fx.Node, inputs: set[fx.Node], permutes: set[fx.Node]) -> bool:
    stack = [start]
    while stack:
        node = stack.pop()
        if node in inputs or node in permutes:
            continue
        if is_swap12(node):
            permutes.add(node)
        elif is_transparent(node):
            inputs.add(node)
            stack.extend(_layout_inputs(node))
        else:
            return False
    return True


def bsnd_plan(call: fx.Node) -> BsndPlan | None:
    """The BSND plan of an SDPA call (inputs and output), or None if either side needs a transpose."""
    inputs: set[fx.Node] = set()
    input_permutes: set[fx.Node] = set()
    if not all(_backward(t, inputs, input_permutes) for t in attention_qkv(call)):
        return None
    # re-emitted nodes must die with the call: nothing outside the path may use them
    inside = inputs | {call}
    if any(user not in inside for node in inputs for user in node.users):
        return None
    outputs: set[fx.Node] = set()
    output_permutes: set[fx.Node] = set()
    region = {call}
    frontier = [call]
    seen: set[fx.Node] = set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            if is_swap12(user):
                seen.add(user)
                output_permutes.add(user)
            elif is_transparent(user) and all(i in region for i in _layout_inputs(user)):
                seen.add(user)
                region.add(user)
                outputs.add(user)
                frontier.append(user)
            elif is_transparent(user) and user.target is torch.cat:
                continue  # another part may join the region later; checked below
            else:
                return None
    # a cat whose parts did not all come from the call, or a path that never returns to BSND
    for node in region:
        for user in node.users:
            if user not in seen:
                return None
    if not output_permutes:
        return None
    order = {n: i for i, n in enumerate(call.graph.nodes)}

    def ordered(nodes: set[fx.Node]) -> tuple[fx.Node, ...]:
        return tuple(sorted(nodes, key=order.__getitem__))

    return BsndPlan(ordered(inputs), ordered(input_permutes), ordered(outputs), ordered(output_permutes))
