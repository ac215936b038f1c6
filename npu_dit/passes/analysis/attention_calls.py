"""What a kernel needs to know about one SDPA call before it accepts it: `CallInfo`.

Read off the call's arguments and their example values: dtype and device of q, the q/k/v shapes in
SDPA's [B, N, S, D] terms, the mask's kind and shape, is_causal, dropout, scale, GQA, and whether the
call can run in BSND without transposes (`attention_layout.bsnd_plan`). Sizes that are symbolic stay
symbolic; a checker that needs a number (a head count) asks for `static(...)`, which reads a constant
only when the symbol is one — it never adds a guard to Dynamo's shape environment. The environment
(torch_npu importable, CUDA present, a graph-mode inner compiler) is part of the call's facts, so a
checker is a pure function of one object.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import sympy
import torch
import torch.fx as fx

from npu_dit.passes.analysis.attention_layout import bsnd_plan
from npu_dit.passes.analysis.attention_ops import is_sdpa, node_value, sdpa_args
from npu_dit.passes.analysis.module_paths import module_path


@dataclasses.dataclass(frozen=True)
class Environment:
    torch_npu: bool  # torch_npu imports here
    cuda: bool  # a CUDA device is present
    graph_mode: bool  # the inner compiler is a graph compiler for NPUs (npugraph_ex / torchair)


def static(value: Any) -> int | float | bool | None:
    """A Python number for a number or a SymInt/SymFloat whose expression is a constant; else None."""
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, torch.SymBool):
        expr = value.node.expr
        return bool(expr) if expr in (sympy.true, sympy.false) else None
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        expr = value.node.expr
        if getattr(expr, "is_number", False):
            return int(expr) if isinstance(value, torch.SymInt) else float(expr)
    return None


@dataclasses.dataclass(frozen=True)
class CallInfo:
    index: int  # position among the graph's SDPA calls
    module: str  # e.g. "transformer_blocks.0.attn"
    device_type: str
    dtype: torch.dtype
    q_shape: tuple  # [B, N, Sq, D] (ints or SymInts)
    k_shape: tuple
    v_shape: tuple
    mask: str | None  # None, "bool" (True = keep) or "float" (added to the scores)
    mask_shape: tuple | None  # as given (broadcast against [B, N, Sq, Skv])
    is_causal: bool | None  # None: not a constant
    dropout_p: float | None  # None: not a constant
    scale: float | None  # the scale to use (SDPA's default filled in); None: not a constant
    enable_gqa: bool | None
    bsnd: bool  # q/k/v arrive, and the output leaves, in BSND with no transposes
    env: Environment
    reference: bool = False  # checked for the reference ops (no NPU): hardware limits do not apply

    @property
    def site(self) -> str:
        return f"attention site {self.index} ({self.module or 'root'})"

    @property
    def q_heads(self) -> int | None:
        return static(self.q_shape[1])

    @property
    def kv_heads(self) -> int | None:
        return static(self.k_shape[1])

    @property
    def head_dim(self) -> int | None:
        return static(self.q_shape[3])

    @property
    def k_head_dim(self) -> int | None:
        return static(self.k_shape[3])

    @property
    def v_head_dim(self) -> int | None:
        return static(self.v_shape[3])

    @property
    def q_len(self) -> int | None:
        return static(self.q_shape[2])

    @property
    def mask_per_head(self) -> bool:
        """The mask has a head axis of size > 1 ([B, N, Sq, Skv] rather than [B, 1, Sq, Skv])."""
        if self.mask_shape is None or len(self.mask_shape) < 3:
            return False
        return static(self.mask_shape[-3]) != 1

    @property
    def gqa(self) -> bool:
        return self.q_heads != self.kv_heads


def _mask_kind(mask: Any) -> tuple[str | None, tuple | None]:
    value = node_value(mask)
    if not isinstance(value, torch.Tensor):
        return None, None
    return ("bool" if value.dtype == torch.bool else "float"), tuple(value.shape)


def call_info(node: fx.Node, index: int, env: Environment) -> CallInfo:
    assert is_sdpa(node), node
    args = sdpa_args(node)
    q, k, v = (node_value(args[name]) for name in ("query", "key", "value"))
    mask, mask_shape = _mask_kind(args["attn_mask"])
    scale = static(node_value(args["scale"]))
    if args["scale"] is None:
        head_dim = static(q.shape[-1])
        scale = 1.0 / math.sqrt(head_dim) if head_dim else None
    return CallInfo(
        index=index,
        module=module_path(node),
        device_type=q.device.type,
        dtype=q.dtype,
        q_shape=tuple(q.shape),
        k_shape=tuple(k.shape),
        v_shape=tuple(v.shape),
        mask=mask,
        mask_shape=mask_shape,
        is_causal=static(node_value(args["is_causal"])),
        dropout_p=static(node_value(args["dropout_p"])),
        scale=scale,
        enable_gqa=static(node_value(args["enable_gqa"])),
        bsnd=q.dim() == 4 and bsnd_plan(node) is not None,
        env=env,
    )


def sdpa_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_sdpa(n)]
