"""The attention kernels the lowering pass can pick: a registry of (name, checker, implementation).

Each `AttentionKernel` has a checker, `CallInfo -> None | reason`, and an implementation that emits the
lowered call into the graph. `AttentionKernelRegistry.select` asks every checker about a call; with
`attention_backend="auto"` the first kernel in the auto order that accepts wins, otherwise the forced
one must accept. The reasons of the others are kept for `npu-dit inspect`.

    auto order:  npu_fia, npu_fa      (tensors on an NPU, torch_npu imported)
                 flash, cudnn, efficient   (tensors on a CUDA GPU)
                 sdpa                 (keep the captured call: PyTorch picks at run time; CPU)
    forced only: math

Forcing `npu_fia` / `npu_fa` where torch_npu is missing and the tensors are on the CPU (or meta) is
how the lowering is tested: the call goes to the reference op of the same schema
(`runtime/npu_attention.py`), checked without the hardware's dtype limits. `auto` never does that.
Checkers mirror the documented limits of each kernel (op-plugin docs for the NPU ops, PyTorch's
sdp_utils for the CUDA ones), conservatively: a call they refuse stays SDPA.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from npu_dit.passes.analysis.attention_calls import CallInfo, static
from npu_dit.passes.analysis.attention_ops import (
    LOWERED_ATTENTION_MASKS,
    LOWERED_ATTENTION_TARGETS,
    SDPA_DEFAULTS,
    SDPA_PARAMS,
)
from npu_dit.runtime import npu_attention as npu
from npu_dit.runtime.sdpa_backends import sdpa_on_backend

Build = Callable[..., fx.Node]  # build(fn or method name, args, kwargs=None) -> a new node with meta["val"]


@dataclasses.dataclass(frozen=True)
class Operands:
    """What an implementation lowers: q/k/v in `layout`, and the SDPA call's other arguments."""

    query: fx.Node
    key: fx.Node
    value: fx.Node
    layout: str  # "BSND" or "BNSD"
    sdpa_args: dict[str, Any]  # attn_mask, dropout_p, is_causal, scale, enable_gqa (nodes or constants)


Implementation = Callable[[Build, CallInfo, Operands], tuple[fx.Node, fx.Node]]  # -> (kernel call, output)


@dataclasses.dataclass(frozen=True)
class AttentionKernel:
    name: str
    check: Callable[[CallInfo], str | None]
    implementation: Implementation | None  # None: keep the captured SDPA call
    layouts: tuple[str, ...] = ("BNSD",)  # preferred first
    has_reference: bool = False  # a reference op stands in when forced without torch_npu


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    call: CallInfo
    kernel: str | None  # None: the forced kernel refused (see refused[forced])
    layout: str
    refused: dict[str, str]  # other kernels -> why they refused
    forced: str | None = None

    @property
    def reference(self) -> bool:
        return self.call.reference

    @property
    def label(self) -> str:
        """e.g. `npu_fia [BSND, reference op]`"""
        return f"{self.kernel} [{self.layout}{', reference op' if self.reference else ''}]"

    def describe(self) -> str:
        """The label and why the other kernels refused the call."""
        if not self.refused:
            return self.label
        return self.label + " (" + "; ".join(f"{name}: {reason}" for name, reason in self.refused.items()) + ")"

    def summary(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "layout": self.layout, "reference": self.reference,
                "refused": dict(self.refused)}


class AttentionKernelRegistry:
    def __init__(self) -> None:
        self._kernels: dict[str, AttentionKernel] = {}
        self.auto_order: list[str] = []

    def register(self, kernel: AttentionKernel, *, auto: bool) -> None:
        self._kernels[kernel.name] = kernel
        if auto:
            self.auto_order.append(kernel.name)

    def __getitem__(self, name: str) -> AttentionKernel:
        return self._kernels[name]

    def names(self) -> list[str]:
        return list(self._kernels)

    def select(self, call: CallInfo, backend: str) -> KernelChoice:
        refused = {k.name: reason for k in self._kernels.values() if (reason := k.check(call))}
        if backend == "auto":
            name = next(n for n in self.auto_order if n not in refused)
            return self._choice(call, name, refused)
        kernel = self[backend]
        if backend in refused and kernel.has_reference and _reference_allowed(call):
            reference_call = dataclasses.replace(call, reference=True)
            reason = kernel.check(reference_call)
            if reason is None:
                return self._choice(reference_call, backend, refused, forced=backend)
            refused[backend] = reason
        if backend in refused:
            return KernelChoice(call, None, "BNSD", refused, forced=backend)
        return self._choice(call, backend, refused, forced=backend)

    def _choice(self, call: CallInfo, name: str, refused: dict[str, str], forced: str | None = None) -> KernelChoice:
        kernel = self[name]
        layout = next((lay for lay in kernel.layouts if lay == "BNSD" or call.bsnd), "BNSD")
        others = {n: r for n, r in refused.items() if n != name}
        return KernelChoice(call, name, layout, others, forced)


def _reference_allowed(call: CallInfo) -> bool:
    return not call.env.torch_npu and call.device_type in ("cpu", "meta")


# --- checkers --------------------------------------------------------------------------------------

HALF = (torch.float16, torch.bfloat16)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _on_npu(call: CallInfo) -> str | None:
    if call.reference or call.device_type == "npu":
        return None
    if not call.env.torch_npu:
        return "torch_npu not available"
    return f"tensors on {call.device_type}, not on an NPU"


def _npu_semantics(call: CallInfo, *, max_head_dim: int) -> str | None:
    """What both NPU ops need of an SDPA call, whatever the hardware."""
    if call.mask == "float":
        return "additive float mask (the NPU ops take bool/uint8 masks, 1 = masked out)"
    if call.is_causal is None:
        return "is_causal is not a constant"
    if call.is_causal:
        return "is_causal=True (causal sparse modes are not lowered; DiT attention is bidirectional)"
    if call.dropout_p is None:
        return "dropout_p is not a constant"
    if call.dropout_p != 0.0:
        return f"dropout_p={call.dropout_p} (an inference kernel: no dropout)"
    if call.scale is None:
        return "scale is not a constant"
    heads, kv_heads = call.q_heads, call.kv_heads
    if heads is None or kv_heads is None:
        return "head counts are not constants"
    if None in (call.head_dim, call.k_head_dim, call.v_head_dim):
        return "head dims are not constants"
    if call.head_dim != call.k_head_dim or call.k_head_dim != call.v_head_dim:
        return f"head dims differ (q {call.head_dim}, k {call.k_head_dim}, v {call.v_head_dim}); key and value must match"
    if heads % kv_heads:
        return f"{heads} query heads is not a multiple of {kv_heads} key/value heads"
    if heads > 256:
        return f"{heads} heads (at most 256)"
    if call.head_dim > max_head_dim:
        return f"head dim {call.head_dim} (at most {max_head_dim})"
    return None


def check_npu_fia(call: CallInfo) -> str | None:
    reason = _on_npu(call) or _npu_semantics(call, max_head_dim=512)
    if reason:
        return reason
    if call.mask_per_head:
        return "per-head mask [B, N, Sq, Skv] (npu_fia takes [B|1, 1, Sq, Skv])"
    if call.q_heads // call.kv_heads > 64:
        return f"{call.q_heads // call.kv_heads} query heads per key/value head (at most 64)"
    if call.q_len == 1:
        return "query length 1 (the incremental branch, whose masks differ, is not lowered)"
    if not call.reference:
        if call.dtype not in HALF:
            return f"dtype {_dtype(call.dtype)} (npu_fia takes float16/bfloat16)"
        if call.head_dim % 16:
            return f"head dim {call.head_dim} is not a multiple of 16 (float16/bfloat16 alignment)"
    return None


def check_npu_fa(call: CallInfo) -> str | None:
    reason = _on_npu(call) or _npu_semantics(call, max_head_dim=768)
    if reason:
        return reason
    if not call.reference:
        if call.dtype not in HALF + (torch.float32,):
            return f"dtype {_dtype(call.dtype)} (npu_fa takes float16/bfloat16/float32)"
        if call.env.graph_mode:
            return "npu_fusion_attention has no graph mode (npu_fia serves npugraph_ex)"
    return None


def _on_cuda(call: CallInfo) -> str | None:
    return None if call.device_type == "cuda" else f"needs a CUDA tensor, this call is on {call.device_type}"


def _head_dim_multiple(call: CallInfo, multiple: int, at_most: int | None = None) -> str | None:
    d = call.head_dim
    if d is None or call.v_head_dim is None:
        return "head dims are not constants"
    if d % multiple or call.v_head_dim % multiple:
        return f"head dim {d} is not a multiple of {multiple}"
    if at_most is not None and max(d, call.v_head_dim) > at_most:
        return f"head dim {max(d, call.v_head_dim)} (at most {at_most})"
    return None


def check_flash(call: CallInfo) -> str | None:
    if reason := _on_cuda(call):
        return reason
    if call.dtype not in HALF:
        return f"dtype {_dtype(call.dtype)} (flash takes float16/bfloat16)"
    if call.mask is not None:
        return "attn_mask (flash takes no mask)"
    return _head_dim_multiple(call, 8, 256)


def check_cudnn(call: CallInfo) -> str | None:
    if reason := _on_cuda(call):
        return reason
    if call.dtype not in HALF:
        return f"dtype {_dtype(call.dtype)} (cuDNN attention takes float16/bfloat16)"
    if call.mask is not None:
        return "attn_mask (not lowered to cuDNN)"
    if call.enable_gqa is not False or call.gqa:
        return "grouped-query attention (not lowered to cuDNN)"
    return _head_dim_multiple(call, 8, 128)


def check_efficient(call: CallInfo) -> str | None:
    if reason := _on_cuda(call):
        return reason
    if call.dtype not in HALF + (torch.float32,):
        return f"dtype {_dtype(call.dtype)} (memory-efficient attention takes float16/bfloat16/float32)"
    if call.enable_gqa is not False or call.gqa:
        return "grouped-query attention (the memory-efficient kernel has none)"
    return _head_dim_multiple(call, 8 if call.dtype in HALF else 4)


def accept_any(call: CallInfo) -> str | None:
    return None


# --- implementations -------------------------------------------------------------------------------


def _npu_mask(build: Build, call: CallInfo, ops: Operands) -> fx.Node | None:
    """SDPA's bool mask (True = keep, broadcast) -> the NPU's (True = masked out, [B|1, 1|N, Sq, Skv])."""
    mask = ops.sdpa_args["attn_mask"]
    if call.mask is None:  # no mask (or an argument that holds None)
        return None
    shape = list(call.mask_shape)
    while len(shape) < 4:
        mask = build(torch.unsqueeze, (mask, 0))
        shape.insert(0, 1)
    seq_axis = ops.layout.index("S")
    sizes: list[Any] = [-1, -1, -1, -1]
    if call.mask_per_head and static(shape[0]) == 1:  # npu_fa takes BNSS, not 1NSS
        sizes[0] = build(torch.ops.aten.sym_size.int, (ops.query, 0))
    if static(shape[2]) == 1:
        sizes[2] = build(torch.ops.aten.sym_size.int, (ops.query, seq_axis))
    if static(shape[3]) == 1:
        sizes[3] = build(torch.ops.aten.sym_size.int, (ops.key, seq_axis))
    masked_out = build(torch.logical_not, (mask,))
    if any(not (isinstance(s, int) and s == -1) for s in sizes):
        masked_out = build("expand", (masked_out, sizes))
    return build("contiguous", (masked_out,))


def _contiguous(build: Build, ops: Operands) -> list[fx.Node]:
    # the NPU ops take contiguous tensors; a no-op when they are (BSND after the all-to-all, B = 1)
    return [build("contiguous", (t,)) for t in (ops.query, ops.key, ops.value)]


def lower_npu_fia(build: Build, call: CallInfo, ops: Operands) -> tuple[fx.Node, fx.Node]:
    op = npu.fused_infer_attention_op(reference=call.reference)
    mask = _npu_mask(build, call, ops)
    kwargs: dict[str, Any] = {
        "num_heads": call.q_heads,
        npu.scale_keyword(op): call.scale,
        "input_layout": ops.layout,
        "num_key_value_heads": call.kv_heads if call.gqa else 0,
        "sparse_mode": 0,
        "inner_precise": 0,
    }
    if mask is not None:  # user mask: high precision with invalid-row correction (a masked row is 0)
        kwargs.update(atten_mask=mask, inner_precise=2)
    kernel = build(op, tuple(_contiguous(build, ops)), kwargs)
    return kernel, build(operator.getitem, (kernel, 0))


def lower_npu_fa(build: Build, call: CallInfo, ops: Operands) -> tuple[fx.Node, fx.Node]:
    op = npu.fusion_attention_op(reference=call.reference)
    mask = _npu_mask(build, call, ops)
    kwargs: dict[str, Any] = {"scale": call.scale, "keep_prob": 1.0, "inner_precise": 0}
    if mask is not None:
        kwargs.update(atten_mask=mask, inner_precise=2)
    kernel = build(op, (*_contiguous(build, ops), call.q_heads, ops.layout), kwargs)
    return kernel, build(operator.getitem, (kernel, 0))


def _lower_sdpa_backend(backend: str) -> Implementation:
    def lower(build: Build, call: CallInfo, ops: Operands) -> tuple[fx.Node, fx.Node]:
        kwargs = {name: ops.sdpa_args[name] for name in SDPA_PARAMS[3:]}
        kernel = build(sdpa_on_backend, (ops.query, ops.key, ops.value), {**kwargs, "backend": backend})
        return kernel, kernel

    lower.__name__ = f"lower_{backend}"
    return lower


@functools.lru_cache(maxsize=None)
def default_registry() -> AttentionKernelRegistry:
    registry = AttentionKernelRegistry()
    registry.register(AttentionKernel("npu_fia", check_npu_fia, lower_npu_fia, ("BSND", "BNSD"), True), auto=True)
    registry.register(AttentionKernel("npu_fa", check_npu_fa, lower_npu_fa, ("BSND", "BNSD"), True), auto=True)
    for name, check in (("flash", check_flash), ("cudnn", check_cudnn), ("efficient", check_efficient)):
        registry.register(AttentionKernel(name, check, _lower_sdpa_backend(name)), auto=True)
    registry.register(AttentionKernel("sdpa", accept_any, None), auto=True)
    registry.register(AttentionKernel("math", accept_any, _lower_sdpa_backend("math")), auto=False)
    return registry


# --- what the analyses see ------------------------------------------------------------------------


def _qkv_positional(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    return node.args[0], node.args[1], node.args[2]


def _fia_mask(node: fx.Node) -> Any:
    return node.kwargs.get("atten_mask")


def _fa_mask(node: fx.Node) -> Any:
    return node.kwargs.get("atten_mask", node.args[7] if len(node.args) > 7 else None)


def _sdpa_backend_mask(node: fx.Node) -> Any:
    return node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else SDPA_DEFAULTS["attn_mask"])


@functools.lru_cache(maxsize=None)
def register_lowered_targets() -> None:
    """Make the analyses (attention sites, token dims) see lowered calls as attention."""
    targets = [(sdpa_on_backend, _sdpa_backend_mask)]
    for reference in (True, False) if npu.torch_npu_available() else (True,):
        targets.append((npu.fused_infer_attention_op(reference=reference), _fia_mask))
        targets.append((npu.fusion_attention_op(reference=reference), _fa_mask))
    for target, mask_reader in targets:
        LOWERED_ATTENTION_TARGETS[target] = _qkv_positional
        LOWERED_ATTENTION_MASKS[target] = mask_reader
