"""npu-dit is for inference: a rewrite that would drop gradients refuses to run under grad mode.

Ulysses' collectives and the cache's reused residuals are not differentiable; an output that came
back silently detached (or half-detached, on a cached step) would train on wrong gradients.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


COLLECTIVES = "npu-dit's collectives are not differentiable (the output would come back detached)"


def grad_required(args: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def refuse_grad(args: Sequence[Any], why: str) -> None:
    if grad_required(args):
        raise RuntimeError(_message(why))


def refusing_runner(why: str) -> Callable[..., Any]:
    """What the backend returns for a graph captured with gradients on under parallelism: Dynamo
    guards on grad mode and on each input's requires_grad, so every call of it would be refused after
    the rewrite; it refuses at once instead, without compiling for nothing."""

    def run(*args: Any) -> Any:
        raise RuntimeError(_message(why))

    return run


def _message(why: str) -> str:
    return (
        f"npu_dit: gradients are on (torch.is_grad_enabled() and an input or parameter requires grad), "
        f"but {why}, so the output would not carry correct gradients. npu-dit is for inference: call the "
        f"model under torch.no_grad() or torch.inference_mode() (diffusers pipelines already do), or "
        f"compile without these options for training"
    )
