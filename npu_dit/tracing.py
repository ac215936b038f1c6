"""How Dynamo traces the frames compiled with `backend="npu_dit"`: every dynamic dim its own symbol.

Dynamo's default *duck shaping* gives dims of equal size one symbol. FLUX.1-dev at 1024x1024 has
4096 image tokens and a 4096-wide T5 input, so the image length would share a symbol with a
weight's width and be specialised to the constant 4096: the token stream could no longer be sharded.
The backend therefore asks Dynamo to trace its frames with duck shaping off, through Dynamo's
documented hook for a backend's tracing context, `backend.backend_ctx_ctor` (a context manager
constructor entered around every call of the compiled function, so around every trace).

`torch.compile(model, backend="npu_dit", ...)` hides the backend behind two wrappers
(`torch._TorchCompileWrapper`, which binds `options=`, and Dynamo's `WrapBackendDebug`) that do not
forward the attribute; `install()` makes `WrapBackendDebug` forward it from the backend it wraps.
Backends without the attribute are unaffected (they get `contextlib.nullcontext`, as before).
Only the frames compiled with this backend trace without duck shaping; nothing else changes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator


def no_duck_shaping() -> contextlib.AbstractContextManager:
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(use_duck_shape=False)


@contextlib.contextmanager
def backend_tracing_context() -> Iterator[None]:
    """Around every call of an npu_dit-compiled function: no duck shaping, and Dynamo's compiles in
    it are npu-dit's (`compile_events`: progress lines, released parameters hidden from tracing)."""
    from npu_dit import compile_events

    with no_duck_shaping(), compile_events.npu_dit_call():
        yield


def _backend_ctx_of(backend: Any) -> Callable[[], contextlib.AbstractContextManager]:
    ctor = getattr(backend, "backend_ctx_ctor", None)
    if ctor is None:  # torch.compile's options-binding wrapper: look at the function it wraps
        ctor = getattr(getattr(backend, "compiler_fn", None), "backend_ctx_ctor", None)
    return ctor if ctor is not None else contextlib.nullcontext


def install() -> None:
    """Make Dynamo see `backend_ctx_ctor` through torch.compile's wrappers (idempotent)."""
    from torch._dynamo.repro.after_dynamo import WrapBackendDebug

    if getattr(WrapBackendDebug, "_npu_dit_forwards_ctx", False):
        return
    WrapBackendDebug.backend_ctx_ctor = property(lambda self: _backend_ctx_of(self._torchdynamo_orig_backend))
    WrapBackendDebug._npu_dit_forwards_ctx = True


def duck_shaping_active() -> bool:
    """Whether a trace right now would share symbols between equal sizes (for warnings)."""
    import torch.fx.experimental._config as fx_config

    return bool(fx_config.use_duck_shape)
