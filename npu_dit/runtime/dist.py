"""Process groups for npu-dit, from torchrun's environment.

One call, `ensure_process_group`, gives the backend a `ParallelContext`: rank, world size and the
group the Ulysses collectives run on. The communication backend follows the device (HCCL on Ascend
NPUs, NCCL on CUDA GPUs, Gloo on CPUs); every group gets a timeout, so a rank that dies makes the
others fail with an error instead of hanging.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from npu_dit.errors import UserError

TIMEOUT_ENV = "NPU_DIT_GROUP_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    rank: int  # rank within the Ulysses group
    world_size: int  # Ulysses degree
    group_name: str  # what functional collectives take
    backend: str  # hccl, nccl or gloo
    timeout_s: float


def group_timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise UserError(f"{TIMEOUT_ENV} must be positive, got {seconds}")
    return seconds


def device_backend(device: torch.device | None = None) -> str:
    """hccl for Ascend NPUs, nccl for CUDA, gloo otherwise."""
    kind = device.type if device is not None else None
    if kind == "npu" or (kind is None and _npu_available()):
        return "hccl"
    if kind == "cuda" or (kind is None and torch.cuda.is_available()):
        return "nccl"
    return "gloo"


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401

        return torch.npu.is_available()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - torch_npu missing or CANN libraries absent
        return False


def ensure_process_group(degree: int, *, device: torch.device | None = None) -> ParallelContext:
    """Return the context for a `degree`-way Ulysses group, initialising torch.distributed if needed.

    The group is the whole world: launch exactly `degree` processes (torchrun --nproc-per-node N).
    """
    timeout_s = group_timeout_s()
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            raise UserError(
                f"ulysses_degree={degree} needs {degree} processes, but this process was not started by "
                f"torchrun (RANK/WORLD_SIZE are not set). Launch with: torchrun --nproc-per-node {degree} script.py"
            )
        backend = device_backend(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world != degree:
        raise UserError(
            f"ulysses_degree={degree} but the process group has {world} ranks; set ulysses_degree={world} "
            f"or launch {degree} processes (torchrun --nproc-per-node {degree})"
        )
    mesh = _ulysses_mesh(degree, device)
    group = mesh.get_group("ulysses")
    return ParallelContext(
        rank=dist.get_rank(group),
        world_size=world,
        group_name=group.group_name,
        backend=dist.get_backend(group),
        timeout_s=timeout_s,
    )


_MESHES: dict[tuple[int, str], object] = {}


def _ulysses_mesh(degree: int, device: torch.device | None):
    """A 1-D DeviceMesh named "ulysses" over the world (a tensor-parallel axis would be a second dim)."""
    from torch.distributed.device_mesh import init_device_mesh

    kind = {"hccl": "npu", "nccl": "cuda"}.get(device_backend(device), "cpu")
    key = (degree, kind)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(kind, (degree,), mesh_dim_names=("ulysses",))
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
