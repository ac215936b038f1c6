"""Process groups for npu-dit, from torchrun's environment.

`ensure_parallel(ulysses_degree, tp_degree)` gives the backend a `ParallelContext` per parallel
axis: rank, size and the group its collectives run on, from a DeviceMesh with named dims ("ulysses",
"tp"); `ensure_process_group` is the Ulysses-only shorthand. The communication backend follows the
device of the compiled graph's tensors (HCCL on Ascend NPUs, NCCL on CUDA GPUs, Gloo on CPUs — also a
CPU model on a machine with a GPU); every group gets a timeout, so a rank that dies makes the others
fail with an error instead of hanging. Beside the device groups, one CPU Gloo group over the world
carries the host decisions (`runtime/planes.py`): data on the device plane, decisions on the host plane.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os

import torch
import torch.distributed as dist

from npu_dit.errors import UserError
from npu_dit.runtime import planes

TIMEOUT_ENV = "NPU_DIT_GROUP_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    rank: int  # rank within this axis' group (Ulysses or TP)
    world_size: int  # the axis' degree
    group_name: str  # what functional collectives take
    backend: str  # hccl, nccl or gloo
    timeout_s: float
    timeout_source: str = f"set with {TIMEOUT_ENV}"  # or "the timeout of your process group"
    # the host subgroup this rank's decisions go over (a CFG branch's ranks); None: the world's
    host_group_name: str | None = None


@dataclasses.dataclass(frozen=True)
class CFGContext:
    """This rank's place in CFG parallelism: its branch (the mesh's "cfg" index), the data group of
    the ranks that hold the same Ulysses/TP position in each branch (the pair the outputs are
    exchanged over), the host group beside it, and the pair's global ranks (branch order)."""

    branch: int
    degree: int
    pair_group: object
    pair_host_group: object
    pair_ranks: tuple[int, ...]


def group_timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"{TIMEOUT_ENV}={value!r} must be a positive, finite number of seconds")
    return seconds


def device_backend(device: torch.device | None = None) -> str:
    """hccl for Ascend NPUs, nccl for CUDA, gloo otherwise."""
    kind = device.type if device is not None else None
    if kind == "npu" or (kind is None and _npu_available()):
        return "hccl"
    if kind == "cuda" or (kind is None and _cuda_available()):
        return "nccl"
    return "gloo"


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401

        return torch.npu.is_available()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - torch_npu missing or CANN libraries absent
        return False


def ensure_process_group(
    degree: int, *, device: torch.device | None = None, option: str = "ulysses_degree"
) -> ParallelContext:
    """Return the context for a `degree`-way Ulysses group, initialising torch.distributed if needed.

    The group is the whole world: launch exactly `degree` processes (torchrun --nproc-per-node N).
    """
    ulysses, _ = ensure_parallel(degree, 1, device=device, option=option)
    return ulysses


def ensure_parallel(
    ulysses_degree: int, tp_degree: int, *, device: torch.device | None = None, option: str = "ulysses_degree",
    cfg_degree: int = 1,
) -> tuple[ParallelContext | None, ParallelContext | None]:
    """The Ulysses and tensor-parallel contexts (None where the degree is 1) on a DeviceMesh of shape
    (cfg_degree, ulysses_degree, tp_degree) named ("cfg", "ulysses", "tp"): TP groups are runs of
    adjacent ranks, Ulysses groups the ranks with the same TP index inside one CFG branch, and each
    branch is a contiguous half of the world. cfg x ulysses x tp must be the world size. Under CFG
    parallelism the contexts' host group is their branch's (`ParallelContext.host_group_name`)."""
    degree = cfg_degree * ulysses_degree * tp_degree
    asked = (f"ulysses_degree={ulysses_degree} x tp_degree={tp_degree}" if tp_degree > 1 and ulysses_degree > 1
             else f"tp_degree={tp_degree}" if tp_degree > 1 else f"{option}={ulysses_degree}")
    if cfg_degree > 1:
        asked = f"cfg_degree={cfg_degree} x " + (asked if degree > cfg_degree else f"{option}={ulysses_degree}")
    timeout_s = group_timeout_s()
    source = f"set with {TIMEOUT_ENV}"
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            raise UserError(
                f"{asked} needs {degree} processes, but this process was not started by "
                f"torchrun (RANK/WORLD_SIZE are not set). Launch with: torchrun --nproc-per-node {degree} script.py"
            )
        backend = device_backend(device)
        _init_group(backend, timeout_s)
    else:
        user_timeout = _group_timeout(dist.group.WORLD)  # the user's group: its timeout applies
        if user_timeout is not None:
            timeout_s, source = user_timeout, "the timeout your init_process_group was given"
    world = dist.get_world_size()
    if world != degree:
        if cfg_degree > 1:
            fix = f"make cfg_degree x ulysses_degree x tp_degree equal {world} or launch {degree} processes"
        elif tp_degree == 1:
            fix = f"set {option}={world} or launch {degree} processes"
        else:
            fix = f"make ulysses_degree x tp_degree equal {world} or launch {degree} processes"
        raise UserError(
            f"{asked} needs {degree} ranks but the process group has {world}; {fix} "
            f"(torchrun --nproc-per-node {degree})"
        )
    mesh = _mesh(ulysses_degree, tp_degree, device, cfg_degree)
    planes.ensure_host_group(timeout_s)  # collectively, on every rank, once per world
    host_name = None
    if cfg_degree > 1:  # collectively too: every rank creates every branch's host group
        branch_size = world // cfg_degree
        branches = [list(range(b * branch_size, (b + 1) * branch_size)) for b in range(cfg_degree)]
        mine = [g for g in planes.ensure_host_subgroups(branches, timeout_s) if g is not None]
        host_name = mine[0].group_name
    kind = mesh.device_type
    declared = torch.device(kind, _device_index(kind)) if kind != "cpu" else planes.CPU
    planes.declare(dist.group.WORLD, declared)
    contexts = []
    for name, size in (("ulysses", ulysses_degree), ("tp", tp_degree)):
        if size == 1:
            contexts.append(None)
            continue
        group = mesh.get_group(name)
        planes.declare(group, declared)
        contexts.append(ParallelContext(
            rank=dist.get_rank(group),
            world_size=size,
            group_name=group.group_name,
            backend=dist.get_backend(group),
            timeout_s=timeout_s,
            timeout_source=source,
            host_group_name=host_name,
        ))
    return contexts[0], contexts[1]


def ensure_cfg(
    ulysses_degree: int, tp_degree: int, *, device: torch.device | None = None, cfg_degree: int = 2
) -> CFGContext:
    """The groups CFG parallelism exchanges over (created with the mesh, collectively, on every rank:
    call it where every rank calls it, the first transformer call of a generation)."""
    ensure_parallel(ulysses_degree, tp_degree, device=device, cfg_degree=cfg_degree)
    mesh = _mesh(ulysses_degree, tp_degree, device, cfg_degree)
    pair_group = mesh.get_group("cfg")
    world, rank = dist.get_world_size(), dist.get_rank()
    branch_size = world // cfg_degree
    pairs = [[p + b * branch_size for b in range(cfg_degree)] for p in range(branch_size)]
    hosts = planes.ensure_host_subgroups(pairs, group_timeout_s())
    mine = rank % branch_size
    kind = mesh.device_type
    planes.declare(pair_group, torch.device(kind, _device_index(kind)) if kind != "cpu" else planes.CPU)
    return CFGContext(branch=rank // branch_size, degree=cfg_degree, pair_group=pair_group,
                      pair_host_group=hosts[mine], pair_ranks=tuple(pairs[mine]))


def _device_index(kind: str) -> int:
    """This rank's accelerator (torchrun's LOCAL_RANK; the current device once one is set)."""
    module = getattr(torch, kind)
    try:
        return module.current_device()
    except Exception:  # noqa: BLE001 - no device runtime: the LOCAL_RANK the device would have
        return int(os.environ.get("LOCAL_RANK", "0"))


def process_group(ctx: ParallelContext):
    """The ProcessGroup object of a context (for eager collectives such as the output gathers)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(ctx.group_name)


def check_same_cache_config(cache: object, ctx: ParallelContext) -> None:
    """Every rank must run the same cache settings: a cache on one rank only, or other thresholds,
    would make the ranks skip different steps and their collectives stop matching (a hang until the
    group timeout). Checked once per compiled graph, with one all-gather; the error is raised on every
    rank, naming each rank's setting."""
    from npu_dit.runtime import agreement

    # the fixed-size agreement record first (a rank calling while this one compiles meets the same
    # collective and both fail clearly); the settings themselves only once every rank is here.
    # Both on the host plane: CPU tensors and objects over the Gloo group beside the device group
    host = ctx.host_group_name
    records = agreement.exchange(agreement.COMPILE, repr(cache), graph="cache options", host=host)
    agreement.check_records(records, agreement.COMPILE, f"cache={cache!r}", ignore_plans=True)
    if len({r[2] for r in records}) == 1:
        return
    settings = planes.host_all_gather_object(repr(cache), "cache options", group=host)
    if len(set(settings)) > 1:
        listing = "; ".join(f"rank {r}: cache={s}" for r, s in enumerate(settings))
        raise UserError(
            f"npu_dit: the ranks were compiled with different cache options ({listing}). Every rank must pass "
            f"the same options={{'cache': ...}} to torch.compile"
        )


def _init_group(backend: str, timeout_s: float) -> None:
    """init_process_group, with a start-up failure that says which ranks are missing and for how long
    this rank waited (the store's own error names neither)."""
    import time

    start = time.monotonic()
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - DistStoreError, RuntimeError from the rendezvous
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        others = [r for r in range(world) if r != rank]
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise RuntimeError(
            f"npu_dit: rank {rank} of {world} waited {time.monotonic() - start:.0f} s (timeout {timeout_s:g} s, "
            f"{TIMEOUT_ENV}) at {where} for rank(s) {others} to join, and they did not: start every rank "
            f"(torchrun --nproc-per-node {world}) or raise {TIMEOUT_ENV}. ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc


def _group_timeout(group: object) -> float | None:
    """The timeout a group really runs with (the user's own, when they created it)."""
    try:
        backend = group._get_backend(torch.device("cpu"))  # type: ignore[attr-defined]
        return backend.options._timeout.total_seconds()
    except Exception:  # noqa: BLE001 - backends without options: fall back to npu-dit's setting
        return None


_MESHES: dict[tuple[int, int, str, int], object] = {}


def _mesh(ulysses_degree: int, tp_degree: int, device: torch.device | None, cfg_degree: int = 1):
    """A DeviceMesh over the world with the named dims that are > 1 ("cfg", "ulysses", "tp")."""
    from torch.distributed.device_mesh import init_device_mesh

    kind = {"hccl": "npu", "nccl": "cuda"}.get(device_backend(device), "cpu")
    key = (ulysses_degree, tp_degree, kind, cfg_degree)
    if key not in _MESHES:
        dims = [(n, s) for n, s in (("cfg", cfg_degree), ("ulysses", ulysses_degree), ("tp", tp_degree)) if s > 1] or [("ulysses", 1)]
        _MESHES[key] = init_device_mesh(kind, tuple(s for _, s in dims), mesh_dim_names=tuple(n for n, _ in dims))
    return _MESHES[key]


def inspection_context(degree: int, rank: int = 0) -> ParallelContext:
    """A context for tracing and inspecting what rank `rank` of `degree` would run (no group)."""
    return ParallelContext(rank=rank, world_size=degree, group_name="inspect", backend="none", timeout_s=0.0)


def free_port() -> int:
    """A free TCP port on localhost for a rendezvous (MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
