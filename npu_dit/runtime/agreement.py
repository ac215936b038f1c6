"""Ranks agree before they exchange: one fixed-size all-gather, at compile time and at every call.

Every check is the same collective — an all-gather of `SLOTS` int64 values — so a rank that compiles
while another calls (Dynamo recompiled on one rank only, say) still meets its peers in a matching
collective: every rank sees every rank's record and raises the same `RankMismatchError`, instead of
one rank aborting inside Gloo ("collective mismatch") or everyone hanging until the group timeout.

record = [MAGIC, kind, hash(what), hash(graph)]; at compile time `what` is the plan and `graph` the
captured graph's signature (a fallback on one rank is not an error; a different graph is); kinds: COMPILE (the plan fingerprint and the
example-input signature) and CALL (the global input shapes of this call).

The records travel on the host plane (`runtime/planes.py`: CPU tensors over the Gloo group beside the
device group), so reading them is no device-to-host copy. At call time `ShapeAgreement` exchanges only
when the call's signature (shapes and dtypes of the non-parameter tensors, the ints) differs from the
last one every rank agreed on: the first call of each new signature, never the steady state.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from npu_dit.errors import RankMismatchError
from npu_dit.plans import stable_hash
from npu_dit.runtime import planes

MAGIC = 0x4E5055444954  # "NPUDIT"
COMPILE, CALL = 1, 2
SLOTS = 5
_KIND = {COMPILE: "compiling a graph", CALL: "calling the compiled model"}


def exchange(kind: int, what: str, *, graph: str = "", fell_back: bool = False, host: str | None = None) -> list[list[int]]:
    """All-gather this rank's record over the host group (`host`: a subgroup's name, a CFG branch's
    ranks; None: the world); returns every rank's [magic, kind, hash(what), fell_back, hash(graph)]."""
    record = torch.tensor([MAGIC, kind, stable_hash(what), int(fell_back), stable_hash(graph)], dtype=torch.int64)
    slots = planes.host_all_gather(record, "agreement" if kind == CALL else "agreement (compile)", group=host)
    return [s.tolist() for s in slots]


class ShapeAgreement:
    """Per executor: the ranks compare a call's global input shapes when its signature is new.

    Parameters are left out (Dynamo guards them, and FLUX.1-dev has ~1,000), and so are the `exclude`
    positions (the 0-d tensors Dynamo makes of float attributes, every norm's eps: numbers, no
    shape): the positions of the other arguments are found on the first call and the signature is
    built from those alone, as a tuple compared with the last agreed one — no string, no hash, no
    collective in the steady state.
    """

    def __init__(self, host: str | None = None, *, exclude: Sequence[int] = ()) -> None:
        self.host = host
        self.exclude = frozenset(exclude)
        self.data_positions: tuple[int, ...] | None = None
        self.agreed: tuple | None = None
        self.exchanges = 0

    def __call__(self, args: Sequence[Any]) -> None:
        if self.data_positions is None:
            self.data_positions = tuple(
                i for i, a in enumerate(args) if not isinstance(a, torch.nn.Parameter) and i not in self.exclude)
        signature = tuple(_part(args[i]) for i in self.data_positions)
        if signature == self.agreed:
            return
        text = call_signature([args[i] for i in self.data_positions])
        check_records(exchange(CALL, text, host=self.host), CALL, f"inputs {text}")
        self.agreed = signature
        self.exchanges += 1


def _part(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return (a.shape, a.dtype)
    if isinstance(a, (bool, int)):
        return a
    return None  # floats (a timestep passed as a number) change every step and are no shape


def check_records(records: Sequence[Sequence[int]], kind: int, detail: str, *, ignore_plans: bool = False) -> None:
    """Raise RankMismatchError (same text on every rank) unless every rank did the same thing:
    the same kind of step on the same graph (slot 4) and, unless `ignore_plans`, the same `what`."""
    kinds = {r[1] for r in records}
    if any(r[0] != MAGIC for r in records) or len(kinds) > 1:
        doing = ", ".join(f"rank {i}: {_KIND.get(r[1], 'something else')}" for i, r in enumerate(records))
        raise RankMismatchError(
            f"npu_dit: the ranks are out of step ({doing}). One rank recompiled the model while another "
            f"ran it: give every rank the same inputs (shapes, dtypes, batch) at every call."
        )
    for slot in ((4,) if ignore_plans else (4, 2)):
        _check_equal([r[slot] for r in records], kind, detail)


def _check_equal(hashes: list[int], kind: int, detail: str) -> None:
    if len(set(hashes)) > 1:
        groups: dict[int, list[int]] = {}
        for i, h in enumerate(hashes):
            groups.setdefault(h, []).append(i)
        split = "; ".join(f"ranks {ranks}" for ranks in groups.values())
        raise RankMismatchError(
            f"npu_dit: the ranks disagree while {_KIND[kind]} ({split} differ; this rank: {detail}). "
            f"Every rank must call the model with the same input shapes (prompt length, resolution, "
            f"batch) and the same options."
        )


def call_signature(args: Sequence[Any]) -> str:
    """Global shapes and dtypes of a call's tensors and values of its plain ints."""
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(f"{tuple(a.shape)}{str(a.dtype)[6:]}")
        elif isinstance(a, (int, bool)):
            parts.append(repr(a))
    return "|".join(parts)
