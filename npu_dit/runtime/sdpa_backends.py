"""PyTorch's own SDPA kernels (flash, cuDNN, memory-efficient, math), one chosen per call site.

The lowering pass replaces `scaled_dot_product_attention(...)` by `sdpa_on_backend(..., backend="flash")`:
the same call under `torch.nn.attention.sdpa_kernel`, so the kernel is fixed when the graph is built
(a checker accepted the call) instead of chosen by PyTorch at run time. Traced by Inductor, the context
manager selects the same kernel (`aten._scaled_dot_product_flash_attention`, ...) at trace time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def sdpa_on_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str,
) -> torch.Tensor:
    with sdpa_kernel(SDPA_BACKENDS[backend]):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
