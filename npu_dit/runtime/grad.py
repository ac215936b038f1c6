"""npu-dit is for inference: a rewrite that would drop gradients refuses to run under grad mode.

Ulysses' collectives and the cache's reused residuals are not differentiable; an output that came
back silently detached (or half-detached, on a cached step) would train on wrong gradients.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def refuse_grad(args: Sequence[Any], why: str) -> None:
    if not torch.is_grad_enabled():
        return
    if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        raise RuntimeError(
            f"npu_dit: gradients are on (torch.is_grad_enabled() and an input or parameter requires grad), "
            f"but {why}, so the output would not carry correct gradients. npu-dit is for inference: call the "
            f"model under torch.no_grad() or torch.inference_mode() (diffusers pipelines already do), or "
            f"compile without these options for training"
        )
