"""What npu-dit does when Dynamo starts and ends compiling a frame of a model compiled with it.

Dynamo runs its compile-start callbacks before it traces a frame and its compile-end callbacks after
the backend has returned (`torch._dynamo.callback_handler`, the documented `on_compile_start` /
`on_compile_end` hooks). They fire for every backend, so the backend's tracing context
(`tracing.backend_tracing_context`, entered around every call of a function compiled with
`backend="npu_dit"`) marks the calls that are ours; subscribers see only compiles inside them — a
frame compiled with another backend is none of npu-dit's business. Two subscribers today: the
compile progress lines (`progress.py`) and the hiding of released parameters' stand-ins while Dynamo
traces (`runtime/weights.py`). `torch._dynamo.reset()` clears Dynamo's callbacks: they are installed
again at the next call of a compiled function.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

_LOCAL = threading.local()
_STARTS: list[Callable[[Any], None]] = []
_ENDS: list[Callable[[Any], None]] = []


def subscribe(start: Callable[[Any], None], end: Callable[[Any], None]) -> None:
    """Call `start(args)` / `end(args)` around each Dynamo compile inside an npu_dit-compiled call."""
    if start not in _STARTS:
        _STARTS.append(start)
    if end not in _ENDS:
        _ENDS.append(end)
    install()


def install() -> None:
    from torch._dynamo import callback_handler

    if _on_start not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(_on_start)
    if _on_end not in callback_handler.end_callbacks:
        callback_handler.register_end_callback(_on_end)


def in_npu_dit_call() -> bool:
    return getattr(_LOCAL, "depth", 0) > 0


@contextlib.contextmanager
def npu_dit_call() -> Iterator[None]:
    """Entered around every call of a function compiled with the npu_dit backend."""
    install()
    _LOCAL.depth = getattr(_LOCAL, "depth", 0) + 1
    try:
        yield
    finally:
        _LOCAL.depth -= 1


def _on_start(args: Any) -> None:
    if not in_npu_dit_call():
        return
    _LOCAL.compiling = True
    for fn in _STARTS:
        fn(args)


def _on_end(args: Any) -> None:
    if not getattr(_LOCAL, "compiling", False):
        return
    _LOCAL.compiling = False
    for fn in reversed(_ENDS):
        fn(args)
