"""Ranks agree before they exchange: one fixed-size all-gather, at compile time and at every call.

Every check is the same collective — an all-gather of `SLOTS` int64 values — so a rank that compiles
while another calls (Dynamo recompiled on one rank only, say) still meets its peers in a matching
collective: every rank sees every rank's record and raises the same `RankMismatchError`, instead of
one rank aborting inside Gloo ("collective mismatch") or everyone hanging until the group timeout.

record = [MAGIC, kind, hash(what), hash(graph)]; at compile time `what` is the plan and `graph` the
captured graph's signature (a fallback on one rank is not an error; a different graph is); kinds: COMPILE (the plan fingerprint and the
example-input signature) and CALL (the global input shapes of this call).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from npu_dit.errors import RankMismatchError
from npu_dit.plans import stable_hash

MAGIC = 0x4E5055444954  # "NPUDIT"
COMPILE, CALL = 1, 2
SLOTS = 5
_KIND = {COMPILE: "compiling a graph", CALL: "calling the compiled model"}


def exchange(kind: int, what: str, *, graph: str = "", fell_back: bool = False, group: Any = None) -> list[list[int]]:
    """All-gather this rank's record; returns every rank's [magic, kind, hash(what), fell_back, hash(graph)]."""
    device = _collective_device(group)
    record = torch.tensor([MAGIC, kind, stable_hash(what), int(fell_back), stable_hash(graph)], dtype=torch.int64,
                          device=device)
    world = dist.get_world_size(group)
    slots = [torch.empty_like(record) for _ in range(world)]
    dist.all_gather(slots, record, group=group)
    return [s.tolist() for s in slots]


def _collective_device(group: Any) -> torch.device:
    """NCCL and HCCL gather device tensors; Gloo CPU ones."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "hccl":
        return torch.device("npu", torch.npu.current_device())  # type: ignore[attr-defined]
    return torch.device("cpu")


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
        elif isinstance(a, (int, float, bool)):
            parts.append(repr(a))
    return "|".join(parts)
