"""Two planes: data collectives on the device group, host decisions on a CPU Gloo group beside it.

    device group (HCCL / NCCL / Gloo): all-to-alls, all-gathers and all-reduces of activations,
                                        with tensors on the group's device
    host group   (always Gloo, CPU):    the cache's per-step decision, the shape agreement, compile-
                                        time checks and error signalling, with CPU tensors / objects

NCCL and HCCL reject CPU tensors, and a host decision made with a device tensor would be a blocking
device-to-host copy on every call; PyTorch's own object collectives and checkpointing keep a Gloo group
beside the device one for the same reason (`dist.new_group(backend="gloo")`). The host group is
created once per world, collectively (every rank calls `ensure_parallel` at its first compile in the
same order), with the device group's timeout.

Every eager collective in npu-dit goes through the helpers here, and every traced one
(`runtime/collectives.py`) calls `check_device`: each group has a declared device (`declare`), and a
tensor on another device is a `PlaneError` naming the group, both devices and the fix — on a CPU
test machine as on NCCL, where the same call would fail inside the backend. `CALLS` counts what each
plane carried (tests and `npu-dit bench` read it).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
from typing import Any

import torch
import torch.distributed as dist

HOST, DATA = "host", "data"
CPU = torch.device("cpu")

_DECLARED: dict[str, torch.device] = {}  # group name -> the device its collectives take
_HOST_GROUP: dict[int, Any] = {}  # id(world group) -> its host Gloo group
# group name -> a host Gloo group over part of the world (a CFG branch's ranks: its graphs' decisions)
_HOST_SUBGROUPS: dict[str, Any] = {}
# (plane, what, group name, device type) -> calls; a handful of keys, bounded
CALLS: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
# what -> bytes the traced collectives sent from this rank (their send buffers), since reset_counts()
SENT_BYTES: collections.Counter[str] = collections.Counter()
_TAP: list[list[tuple[str, int]]] = []  # open `tap_sends` records: meta and fake runs included


class PlaneError(RuntimeError):
    """A collective was handed a tensor on a device its group does not take."""


def group_name(group: Any) -> str:
    if isinstance(group, str):
        return group
    return (group or dist.group.WORLD).group_name


def declare(group: Any, device: torch.device) -> None:
    """Record the device a group's collectives take (NCCL: this rank's GPU; Gloo: the CPU)."""
    _DECLARED[group_name(group)] = torch.device(device)


def declared_device(group: Any) -> torch.device | None:
    return _DECLARED.get(group_name(group))


def check_device(group: Any, tensor: torch.Tensor, what: str) -> None:
    """Raise PlaneError when `tensor` is not on the device `group` was declared with. Fake and meta
    tensors (tracing, `inspect`) are not checked."""
    name = group_name(group)
    declared = _DECLARED.get(name)
    device = tensor.device
    if declared is None or device.type == "meta" or _is_fake(tensor):
        return
    if device.type != declared.type or (declared.index is not None and device.index not in (None, declared.index)):
        raise PlaneError(
            f"npu_dit: {what} on process group {name!r} got a tensor on {device}, but that group's collectives "
            f"take tensors on {declared}. Host decisions go over the CPU Gloo group (planes.host_group()), "
            f"activations over the device group, each with tensors on its own device."
        )


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def ensure_host_group(timeout_s: float) -> Any:
    """The CPU Gloo group over the whole world (created once, collectively, on every rank)."""
    world = dist.group.WORLD
    key = id(world)
    if key not in _HOST_GROUP or not _alive(_HOST_GROUP[key]):
        _HOST_GROUP.clear()  # a new world (destroyed and initialised again): the old group is gone
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        _HOST_GROUP[key] = group
        declare(group, CPU)
    return _HOST_GROUP[key]


def _alive(group: Any) -> bool:
    """False for a group of a world that was destroyed (a new world object may reuse the old id)."""
    from torch.distributed.distributed_c10d import _world

    return group in _world.pg_map


def ensure_host_subgroups(rank_lists: list[list[int]], timeout_s: float) -> list[Any]:
    """CPU Gloo groups over parts of the world (`dist.new_group` is collective: every rank creates
    every list, in the same order, once). Under CFG parallelism each branch's ranks decide among
    themselves (shape agreement, cache decisions) while the other branch runs other calls."""
    out = []
    for ranks in rank_lists:
        key = f"world{id(dist.group.WORLD)}:ranks{tuple(ranks)}"
        member = dist.get_rank() in ranks
        if key not in _HOST_SUBGROUPS or (member and not _alive(_HOST_SUBGROUPS[key])):
            group = dist.new_group(ranks=list(ranks), backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
            _HOST_SUBGROUPS[key] = group if member else None
            if member:
                declare(group, CPU)
                _HOST_SUBGROUPS[group.group_name] = group
        out.append(_HOST_SUBGROUPS[key])
    return out


def host_group(name: str | None = None) -> Any:
    """The host group of the current world (`ensure_host_group` must have run: ensure_parallel does),
    or the host subgroup called `name` (a CFG branch's ranks)."""
    if name is not None:
        group = _HOST_SUBGROUPS.get(name)
        if group is None or not _alive(group):
            raise RuntimeError(f"npu_dit: no host group {name!r}: call npu_dit.runtime.dist.ensure_parallel first (every rank)")
        return group
    group = _HOST_GROUP.get(id(dist.group.WORLD))
    if group is None or not _alive(group):
        raise RuntimeError("npu_dit: no host group: call npu_dit.runtime.dist.ensure_parallel first (every rank)")
    return group


# -- host plane -----------------------------------------------------------------------------------


def host_all_gather(tensor: torch.Tensor, what: str, *, group: Any = None) -> list[torch.Tensor]:
    group = group if group is not None and not isinstance(group, str) else host_group(group)
    check_device(group, tensor, what)
    slots = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(slots, tensor, group=group)
    CALLS[(HOST, what, group_name(group), tensor.device.type)] += 1
    return slots


def host_all_reduce(tensor: torch.Tensor, what: str, *, group: Any = None) -> torch.Tensor:
    group = group if group is not None and not isinstance(group, str) else host_group(group)
    check_device(group, tensor, what)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    CALLS[(HOST, what, group_name(group), tensor.device.type)] += 1
    return tensor


def host_all_gather_object(obj: Any, what: str, *, group: Any = None) -> list[Any]:
    group = group if group is not None and not isinstance(group, str) else host_group(group)
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    CALLS[(HOST, what, group_name(group), "cpu")] += 1
    return out


def host_broadcast_object(obj: Any, src: int, group: Any, what: str) -> Any:
    """`obj` from global rank `src` to every rank of `group` (a host group)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    CALLS[(HOST, what, group_name(group), "cpu")] += 1
    return box[0]


# -- data plane -----------------------------------------------------------------------------------


def data_all_gather_into_tensor(output: torch.Tensor, tensor: torch.Tensor, group: Any, what: str) -> torch.Tensor:
    """One all-gather into a preallocated buffer (`output`: world x tensor along dim 0)."""
    check_device(group, tensor, what)
    check_device(group, output, what)
    dist.all_gather_into_tensor(output, tensor, group=group)
    CALLS[(DATA, what, group_name(group), tensor.device.type)] += 1
    return output


def data_broadcast(tensor: torch.Tensor, src: int, group: Any, what: str) -> torch.Tensor:
    """`tensor` (in place) from global rank `src` to every rank of `group`."""
    check_device(group, tensor, what)
    dist.broadcast(tensor, src=src, group=group)
    CALLS[(DATA, what, group_name(group), tensor.device.type)] += 1
    return tensor


def record_traced(group: Any, tensor: torch.Tensor, what: str) -> None:
    """A traced collective (`runtime/collectives.py`): checked, and counted when it runs eagerly
    (under Dynamo or make_fx only the shape of the program is being recorded)."""
    if torch.compiler.is_compiling():
        return
    check_device(group, tensor, what)
    if any(isinstance(size, torch.SymInt) for size in tensor.shape):
        return  # traced by make_fx (Inductor's AOT trace): symbolic sizes, nothing is sent
    shapes_only = tensor.device.type == "meta" or _is_fake(tensor)
    nbytes = tensor.numel() * tensor.element_size()
    if _TAP:
        _TAP[-1].append((what, nbytes))
    if not shapes_only:
        CALLS[(DATA, what, group_name(group), tensor.device.type)] += 1
        SENT_BYTES[what] += nbytes


@contextlib.contextmanager
def tap_sends():
    """Record (what, bytes) of every traced collective's send buffer while open, shapes-only runs
    (meta tensors: `inspect`) included."""
    record: list[tuple[str, int]] = []
    _TAP.append(record)
    try:
        yield record
    finally:
        _TAP.pop()


def counts(plane: str | None = None) -> dict[str, int]:
    """Calls per `what` (optionally of one plane) since the last `reset_counts()`."""
    out: dict[str, int] = collections.Counter()
    for (p, what, _, _), n in CALLS.items():
        if plane is None or p == plane:
            out[what] += n
    return dict(out)


def sent_bytes() -> dict[str, int]:
    """Bytes sent per `what` by the traced collectives since the last `reset_counts()`."""
    return dict(SENT_BYTES)


def reset_counts() -> None:
    CALLS.clear()
    SENT_BYTES.clear()
