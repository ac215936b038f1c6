"""Which call targets are attention, linear and normalisation ops, and how to read their arguments.

Dynamo records torch-level calls (`torch._C._nn.scaled_dot_product_attention`, `torch._C._nn.linear`);
graphs built by hand or by other front ends may use `torch.nn.functional.*` or ATen overloads. The
lowering pass registers its own attention targets here so that every analysis keeps seeing the
lowered call sites as attention.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

SDPA_TARGETS: set[object] = {
    F.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
}
# targets of lowered attention calls (registered by passes/attention_kernels.py); each maps to a
# function node -> (query, key, value) in BNSD-or-BSND terms, see `attention_qkv`
LOWERED_ATTENTION_TARGETS: dict[object, object] = {}
# and to a function node -> its mask node or None (a lowered mask may have another polarity: only its
# shape [.., Sq, Skv] matters to the analyses)
LOWERED_ATTENTION_MASKS: dict[object, object] = {}
# node.meta key naming the layout a lowered call reads q/k/v in ("BNSD" when absent, SDPA's)
ATTENTION_LAYOUT_KEY = "npu_dit.attention_layout"

LINEAR_TARGETS: set[object] = {F.linear, torch._C._nn.linear, torch.ops.aten.linear.default}
NORM_TARGETS: set[object] = {
    F.layer_norm,
    F.rms_norm,
    torch.rms_norm,
    torch.layer_norm,
    F.group_norm,
    torch.ops.aten.layer_norm.default,
    torch.ops.aten.rms_norm.default,
}


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def ensure_lowered_targets() -> None:
    """The lowered kernels' targets are known to every analysis, whether or not this process has
    lowered anything yet (what an analysis concludes must not depend on process history)."""
    from npu_dit.passes.attention_kernels import register_lowered_targets

    register_lowered_targets()


def is_attention_call(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in SDPA_TARGETS:
        return True
    ensure_lowered_targets()
    return node.target in LOWERED_ATTENTION_TARGETS


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_TARGETS


def is_norm(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in NORM_TARGETS


def sdpa_args(node: fx.Node) -> dict[str, object]:
    """The SDPA call's arguments by name, defaults filled in."""
    bound = dict(SDPA_DEFAULTS)
    bound.update(zip(SDPA_PARAMS, node.args))
    bound.update(node.kwargs)
    return bound


def attention_qkv(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    if is_sdpa(node):
        args = sdpa_args(node)
        return args["query"], args["key"], args["value"]
    ensure_lowered_targets()
    reader = LOWERED_ATTENTION_TARGETS[node.target]
    return reader(node)  # type: ignore[operator]


def attention_mask(node: fx.Node) -> object:
    """The mask argument of an attention call (SDPA or lowered), or None."""
    if is_sdpa(node):
        return sdpa_args(node)["attn_mask"]
    ensure_lowered_targets()
    reader = LOWERED_ATTENTION_MASKS.get(node.target)
    return reader(node) if reader is not None else None  # type: ignore[operator]


def attention_layout(node: fx.Node) -> str:
    """"BNSD" (SDPA) or "BSND": which axes of q/k/v hold the heads and the sequence."""
    return node.meta.get(ATTENTION_LAYOUT_KEY, "BNSD")


def node_value(node: object) -> object:
    """The example value Dynamo (or a pass) recorded for a node; plain values pass through."""
    if isinstance(node, fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


def graph_fake_mode(gm: fx.GraphModule):
    """The FakeTensorMode (and so the ShapeEnv) of the graph's own metadata.

    Not `detect_fake_mode()`: inside a backend that returns the tracing context's mode, which Dynamo
    keeps separate from the one its recorded example values live in.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    for node in gm.graph.nodes:
        value = node_value(node)
        if isinstance(value, FakeTensor):
            return value.fake_mode
    return None
