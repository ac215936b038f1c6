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
