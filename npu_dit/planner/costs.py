"""What one call of each pipeline stage costs, read from graphs: matmul FLOPs, attention FLOPs (and the
score bytes a non-fused kernel would write), bytes that memory-bound ops move, parameter bytes, the peak of
live activations, and the bytes each collective sends.

The transformer: the Dynamo graph `backend="npu_dit"` receives (captured once on the meta device), and the
graphs the passes make of it for rank 0 of Ulysses-2 and of TP-2. A quantity `q` is split into a part the
degree divides and a part it does not (the replicated text stream, the embeddings, the norms under TP):
with `q1` on the serial graph and `q2` on the degree-2 graph, `sharded = 2 (q1 - q2)` and
`kept = q1 - sharded`, so `q(P) = kept + sharded / P`. The collectives' send buffers are measured on the
degree-2 graph (`collective_report`) and scale as 2/P (Ulysses: N/P tokens x h per tensor) or stay
(TP's all-reduces carry whole activations). Running the passes at every degree would cost ~8 s each on a
full-size graph; one degree-2 run per kind gives the same split for every degree.

Text encoders and VAEs: their modules run once on the meta device under a dispatch mode that counts the
aten ops (no Dynamo capture needed for a cost: these graphs are not rewritten by Ulysses).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode

from npu_dit.passes.analysis.attention_ops import LINEAR_TARGETS, attention_qkv, is_attention_call, node_value
from npu_dit.tools.region_report import _hint, node_flops

# call_method / call_function targets that only re-describe memory (no bytes moved)
_VIEW_METHODS = {"view", "reshape", "permute", "transpose", "unflatten", "flatten", "expand", "size", "chunk",
                 "split", "unbind", "unsqueeze", "squeeze", "dim", "__getitem__", "view_as", "expand_as", "t",
                 "movedim", "narrow", "split_with_sizes", "numel", "stride", "is_contiguous"}
_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.permute, torch.transpose, torch.unflatten, torch.flatten,
                   torch.chunk, torch.split, torch.unbind, torch.unsqueeze, torch.squeeze, torch.movedim, torch.narrow,
                   torch.t, torch.split_with_sizes}


@dataclasses.dataclass
class GraphCost:
    """One call of one graph, on one rank."""

    matmul_flops: float = 0.0
    attention_flops: float = 0.0
    score_elements: float = 0.0  # B*H*Sq*Sk summed over attention calls (what a materialising kernel writes)
    memory_bytes: float = 0.0  # bytes in + out of every memory-bound op
    parameter_bytes: float = 0.0
    activation_peak_bytes: float = 0.0
    output_bytes: float = 0.0
    attention_calls: int = 0
    # the convolutions' share of matmul_flops by kernel class ("conv2d", "conv3d", "conv3d_native": see
    # `conv_class` and `Hardware.kernels`)
    conv_flops: dict[str, float] = dataclasses.field(default_factory=dict)

    FIELDS = ("matmul_flops", "attention_flops", "score_elements", "memory_bytes", "parameter_bytes",
              "activation_peak_bytes")

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def _numel(value: torch.Tensor) -> int:
    total = 1
    for s in value.shape:
        total *= _hint(s)
    return total


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return _numel(value) * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS or getattr(node.target, "__name__", "") in _VIEW_METHODS
    return True


def _is_collective(node: fx.Node) -> bool:
    return getattr(node.target, "__module__", "").startswith("npu_dit.runtime")


def graph_cost(gm: fx.GraphModule) -> GraphCost:
    cost = GraphCost()
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position[u] for u in n.users), default=position[n]) for n in nodes}
    frees: dict[int, list[int]] = {}
    live = 0
    for i, node in enumerate(nodes):
        value = node_value(node)
        if node.op == "placeholder" and _is_parameter(node):
            cost.parameter_bytes += _tensor_bytes(value)
            continue  # weights are not activations (nothing is registered to free for them)
        if node.op == "output":
            cost.output_bytes = _tensor_bytes(node_value(node.args[0][0]) if isinstance(node.args[0], (list, tuple))
                                              and node.args[0] else None)
            continue
        if node.op == "call_function" and node.target in LINEAR_TARGETS:
            cost.matmul_flops += node_flops(node)
        elif node.op == "call_function" and is_attention_call(node):
            cost.attention_flops += node_flops(node)
            cost.attention_calls += 1
            q_node, k_node, _ = attention_qkv(node)
            q, k = node_value(q_node), node_value(k_node)
            cost.score_elements += _numel(q) // _hint(q.shape[-1]) * _hint(k.shape[-2])
        elif node.op in ("call_function", "call_method") and not _is_view(node) and not _is_collective(node):
            inputs = sum(_tensor_bytes(node_value(a)) for a in node.all_input_nodes
                         if not _is_parameter(a))
            cost.memory_bytes += inputs + _tensor_bytes(value)
        # live activations: a tensor made here stays until its last user ran (views share their base)
        if node.op == "placeholder" or not _is_view(node):
            size = _tensor_bytes(value)
            live += size
            cost.activation_peak_bytes = max(cost.activation_peak_bytes, live)
            frees.setdefault(last_use[node], []).append(size)
        live -= sum(frees.pop(i, ()))
    return cost


def _is_parameter(node: fx.Node) -> bool:
    if node.op != "placeholder":
        return False
    if isinstance(node_value(node), torch.nn.Parameter):
        return True
    # a rewritten graph (a copy) keeps the input's source name, not the Parameter flag of its fake value
    name = node.meta.get("npu_dit.input_name") or ""
    if not name:
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = getattr(source, "name", "")
        name = name() if callable(name) else name
    return "._parameters[" in name or "._buffers[" in name or "_parameters" in name


def overlap_windows(gm: fx.GraphModule) -> list[dict[str, float]]:
    """For each collective start: the bytes it sends and the work the schedule placed between it and its wait
    (what async Ulysses can hide the transfer behind; empty windows in a synchronous graph)."""
    from npu_dit.runtime import collectives as C

    starts, waits = set(C.COLLECTIVE_STARTS), set(C.COLLECTIVE_WAITS)
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    work = [_node_work(n) for n in nodes]
    windows = []
    for node in nodes:
        if node.op != "call_function" or node.target not in starts:
            continue
        wait = min((u for u in node.users if u.op == "call_function" and u.target in waits), key=position.get, default=None)
        if wait is None:
            continue
        sent = node.args[:3] if node.target is C.seq_to_heads_qkv_start else node.args[:1]
        between = work[position[node] + 1:position[wait]]
        windows.append({"bytes": float(sum(_tensor_bytes(node_value(a)) for a in sent)),
                        "flops": float(sum(f for f, _ in between)), "memory_bytes": float(sum(b for _, b in between))})
    return windows


def _node_work(node: fx.Node) -> tuple[float, float]:
    """(FLOPs, memory-bound bytes) of one node, as `graph_cost` counts them."""
    if node.op == "call_function" and (node.target in LINEAR_TARGETS or is_attention_call(node)):
        return float(node_flops(node)), 0.0
    if node.op in ("call_function", "call_method") and not _is_view(node) and not _is_collective(node):
        inputs = sum(_tensor_bytes(node_value(a)) for a in node.all_input_nodes if not _is_parameter(a))
        return 0.0, float(inputs + _tensor_bytes(node_value(node)))
    return 0.0, 0.0


def split_by_degree(serial: GraphCost, at_two: GraphCost) -> dict[str, dict[str, float]]:
    """{field: {"kept", "sharded"}} with q(P) = kept + sharded / P, from the serial and degree-2 graphs."""
    out = {}
    for field in GraphCost.FIELDS:
        q1, q2 = getattr(serial, field), getattr(at_two, field)
        sharded = max(0.0, min(q1, 2.0 * (q1 - q2)))
        out[field] = {"kept": q1 - sharded, "sharded": sharded}
    return out


class _CountOps(TorchDispatchMode):
    """Counts an eager call's aten ops: matmul/conv FLOPs (torch's flop counter formulas), attention FLOPs,
    and the bytes of the memory-bound ops (views excluded)."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.cost = GraphCost()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        tensors_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if packet in self.registry:
            flops = self.registry[packet](*args, **kwargs, out_val=out)
            name = str(packet)
            if "attention" in name:
                self.cost.attention_flops += flops
                self.cost.attention_calls += 1
            else:
                self.cost.matmul_flops += flops
                if "convolution" in name:
                    kind = conv_class(*args[:9])
                    self.cost.conv_flops[kind] = self.cost.conv_flops.get(kind, 0.0) + flops
        elif not func.is_view and packet not in (torch.ops.aten.detach, torch.ops.aten._to_copy, torch.ops.aten.lift_fresh):
            self.cost.memory_bytes += sum(_tensor_bytes(a) for a in tensors_in) + _tensor_bytes(
                [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)])
        return out


def conv_class(x, weight, bias=None, stride=(1,), padding=(0,), dilation=(1,), transposed=False, output_padding=(0,),
               groups=1) -> str:
    """"conv2d" / "conv3d", with "_native" where PyTorch's CPU float kernels would run their own (slow)
    convolution instead of oneDNN's: its rule (`ConvParams::use_mkldnn`) takes oneDNN for grouped, batched or
    large-kernel convolutions, or once N * C * D(or H) * H(or W) of the input exceeds 20480, and its own
    kernel for an unstrided 1x1 convolution on one thread. A 3-D convolution of 8 channels over 3 x 512 x 512
    is native; over 3 x 1024 x 1024, oneDNN (5-6x faster on this project's CPU)."""
    kind = f"conv{x.dim() - 2}d"
    if transposed:
        return kind
    n, size = int(x.shape[0]), 1
    for d in x.shape[:4]:
        size *= int(d)
    k = [int(d) for d in weight.shape[2:]]
    plain = all(int(v) == 1 for v in stride) and all(int(v) == 1 for v in dilation)
    if plain and n < 16 and k[-1] == 1 and k[-2] == 1:
        return f"{kind}_native"
    onednn = groups > 1 or (k[-1] > 3 and k[-2] > 3) or n > 1 or size > 20480
    return kind if onednn else f"{kind}_native"


def module_cost(module: torch.nn.Module, call) -> GraphCost:
    """Run `call(module)` on the meta device (module moved there) and count it."""
    module = module.to("meta") if next(module.parameters()).device.type != "meta" else module
    counter = _CountOps()
    with torch.no_grad(), counter:
        call(module)
    counter.cost.parameter_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    return counter.cost
