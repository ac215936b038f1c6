"""A visible compile: rank 0 says when npu-dit starts compiling a frame and how long each part took.

    npu_dit: compiling frame 0/0 (rank 0 of 2): Dynamo tracing, then npu-dit's passes ...
    npu_dit: compiled frame 0/0 in 21.4 s: Dynamo tracing 3.1 s, npu-dit passes 18.2 s, inner compiler (eager) 0.0 s

The lines go to the `npu_dit.compile` logger (INFO, its own stderr handler, rank 0 only);
`npu_dit.set_verbose(False)` or `logging.getLogger("npu_dit.compile").setLevel(logging.WARNING)`
silences them (`npu-dit generate --quiet` does). `compile_seconds()` is the wall time of every compile
in this process so far (generate's "compile" row); an inner compiler that compiles on the first call
of the rewritten graph (Inductor) adds its time there too, with a line of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from typing import Any

from npu_dit import compile_events

class _Handler(logging.StreamHandler):
    """stderr, through tqdm's `write` where tqdm is loaded, so a line does not land inside a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")
        if tqdm is None or not hasattr(tqdm, "tqdm"):
            return super().emit(record)
        try:
            tqdm.tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


log = logging.getLogger("npu_dit.compile")
if not log.handlers:
    _handler = _Handler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def set_verbose(verbose: bool) -> None:
    """Show (True, the default) or hide npu-dit's compile progress lines."""
    log.setLevel(logging.INFO if verbose else logging.WARNING)


@dataclasses.dataclass
class _Compile:
    compile_id: str
    start: float
    backend_entered: float | None = None
    passes_s: float = 0.0
    inner_s: float = 0.0
    inner_compiler: str = "eager"
    note: str = ""


_LOCAL = threading.local()
_TOTAL = {"seconds": 0.0, "compiles": 0, "tracing": 0.0, "passes": 0.0, "inner": 0.0}
_LOCK = threading.Lock()


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _say(message: str) -> None:
    if _rank() == 0:
        log.info(message)


def compile_seconds() -> float:
    """Seconds this process has spent compiling frames with npu_dit (all of them, so far)."""
    return _TOTAL["seconds"]


def compile_time_parts() -> dict[str, float]:
    """This process's compiles so far: their count and their wall seconds in all ("seconds") and by
    part: Dynamo's tracing up to the backend ("tracing"), npu-dit's passes ("passes"), the inner
    compiler, lazy first-call compiles included ("inner")."""
    with _LOCK:
        return dict(_TOTAL)


def _add(seconds: float, **parts: float) -> None:
    with _LOCK:
        _TOTAL["seconds"] += seconds
        for part, value in parts.items():
            _TOTAL[part] += value


def _on_start(args: Any) -> None:
    compile_id = str(getattr(args, "compile_id", "?"))
    _LOCAL.current = _Compile(compile_id, time.perf_counter())
    world = _world()
    where = f" (rank 0 of {world})" if world > 1 else ""
    _say(f"npu_dit: compiling frame {compile_id}{where}: Dynamo tracing, then npu-dit's passes ...")


def _on_end(args: Any) -> None:
    record: _Compile | None = getattr(_LOCAL, "current", None)
    _LOCAL.current = None
    if record is None:
        return
    total = time.perf_counter() - record.start
    tracing = (record.backend_entered or time.perf_counter()) - record.start
    _add(total, compiles=1, tracing=tracing, passes=record.passes_s, inner=record.inner_s)
    if record.backend_entered is None:  # Dynamo found nothing to hand the backend (or failed first)
        _say(f"npu_dit: frame {record.compile_id}: {total:.1f} s in Dynamo, which handed npu-dit no graph")
        return
    _say(
        f"npu_dit: compiled frame {record.compile_id} in {total:.1f} s: Dynamo tracing {tracing:.1f} s, "
        f"npu-dit passes {record.passes_s:.1f} s, inner compiler ({record.inner_compiler}) {record.inner_s:.1f} s"
        + (f"; {record.note}" if record.note else "")
    )


def backend_entered(inner_compiler: str) -> None:
    """The backend got Dynamo's graph: tracing is over."""
    record: _Compile | None = getattr(_LOCAL, "current", None)
    if record is not None:
        record.backend_entered = time.perf_counter()
        record.inner_compiler = inner_compiler


def add_time(part: str, seconds: float) -> None:
    """`part` is "passes" or "inner", during a compile."""
    record: _Compile | None = getattr(_LOCAL, "current", None)
    if record is not None:
        setattr(record, f"{part}_s", getattr(record, f"{part}_s") + seconds)


def note(text: str) -> None:
    record: _Compile | None = getattr(_LOCAL, "current", None)
    if record is not None:
        record.note = text


def inner_compiled_lazily(name: str, seconds: float) -> None:
    """An inner compiler that compiled the rewritten graph on its first call (after Dynamo's compile)."""
    _add(seconds, inner=seconds)
    _say(f"npu_dit: inner compiler ({name}) compiled the rewritten graph in {seconds:.1f} s on its first call")


compile_events.subscribe(_on_start, _on_end)
