"""The two ways npu-dit says no, shared by the backend, the passes and the runtime.

- `UserError` (a `ValueError`): a problem the user can fix — a bad option, a world size that does not
  match the launch. Always raised, with the fix in the message.
- `Refusal`: a pass cannot prove its rewrite exact for this graph (an op with no sharding rule, a
  per-block graph after a graph break, a graph with no attention). The runner drops the rewrite and
  the captured graph runs unchanged, after one warning that names the reason (and the fix, when the
  user has one). Every rank takes the same decision (the backend compares them).
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix (bad option, wrong world size): always raised."""


class Refusal(Exception):
    """A rewrite this pass cannot prove exact for this graph; the graph runs unrewritten.

    `fix` tells the user what would let the rewrite fire, when there is something to do.
    """

    def __init__(self, reason: str, *, fix: str | None = None) -> None:
        super().__init__(reason if fix is None else f"{reason}. {fix}")
        self.reason = reason
        self.fix = fix


class RankMismatchError(RuntimeError):
    """Ranks compiled or called the same model differently (different shapes, plans or options)."""


def _library_dirs() -> tuple[str, ...]:
    import os
    import sysconfig

    import torch

    import npu_dit

    dirs = [os.path.dirname(torch.__file__), os.path.dirname(npu_dit.__file__), sysconfig.get_paths()["stdlib"]]
    for name in ("diffusers", "transformers", "accelerate", "tqdm"):
        module = __import__("sys").modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            dirs.append(os.path.dirname(module.__file__))
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs)


def warn_user(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """`warnings.warn` attributed to the user's line: the innermost frame outside torch, npu_dit, the
    model libraries and the standard library (a warning raised while Dynamo compiles would otherwise
    point at a line of npu_dit or of torch, which `stacklevel` cannot reach past reliably)."""
    import os
    import sys
    import warnings

    libraries = _library_dirs()
    frame = sys._getframe(1)
    outermost = frame
    while frame is not None:
        filename = os.path.realpath(frame.f_code.co_filename)
        if not filename.startswith(libraries) and not frame.f_code.co_filename.startswith("<"):
            break
        outermost = frame
        frame = frame.f_back
    frame = frame or outermost
    module_globals = frame.f_globals
    warnings.warn_explicit(
        message, category, frame.f_code.co_filename, frame.f_lineno,
        module=module_globals.get("__name__", "__main__"),
        registry=module_globals.setdefault("__warningregistry__", {}),
        module_globals=module_globals,
    )
