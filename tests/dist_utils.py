"""Run a function on N real processes with a Gloo group (what torchrun would do), with timeouts.

Ranks are forked from a fork server that has imported torch, diffusers, transformers and npu_dit
once (`multiprocessing`'s "forkserver" start method with a preload list): each rank starts in well
under a second instead of importing them again, and it is still a fresh process (no threads, no
Dynamo state or process group inherited from the test process; the server holds the code as it was
when the first test spawned). Every rank gets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (a free port)
in its environment and a short NPU_DIT_GROUP_TIMEOUT, so a broken collective fails instead of
hanging; the parent kills any rank still alive after `timeout` seconds and fails the test.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from typing import Any, Callable

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, group_timeout: float, out_dir: str, kwargs: dict) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), NPU_DIT_GROUP_TIMEOUT=str(group_timeout), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        result = fn(rank=rank, world_size=world, **kwargs)
        from npu_dit.progress import compile_time_parts

        torch.save({"ok": True, "result": result, "cpu_seconds": _cpu_seconds(),
                    "compile_parts": compile_time_parts()}, path)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}, path)
        raise SystemExit(1)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


RANK_CPU_SECONDS = [0.0]  # CPU seconds of every rank run_ranks started in this process (tests/conftest.py reads it)
RANK_COMPILE_PARTS: dict[str, float] = {}  # their npu_dit compile times by part (npu_dit.progress.compile_time_parts)


PRELOAD = [
    "torch", "torch.distributed", "torch._dynamo", "torch._functorch.aot_autograd",
    "diffusers.models.transformers.transformer_flux", "diffusers.models.transformers.transformer_qwenimage",
    "diffusers.models.autoencoders.autoencoder_kl", "diffusers.models.autoencoders.autoencoder_kl_qwenimage",
    "transformers.models.t5.modeling_t5", "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "npu_dit.backend", "tests.conftest",
    "tests.rank_warmup",  # last: one eager compile per tiny model family, then Dynamo is reset
]  # a name that fails to import is skipped by the fork server (the rank imports it itself)
_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def run_ranks(fn: Callable, world_size: int, tmp_path, *, timeout: float = 600, group_timeout: float = 60,
              allow_failures: bool = False, **kwargs: Any) -> list[dict]:
    """Run `fn(rank=, world_size=, **kwargs)` on `world_size` processes; return each rank's record."""
    ctx = _context()
    port = free_port()
    out_dir = str(tmp_path)
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, group_timeout, out_dir, kwargs), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        raise AssertionError(f"ranks {hung} were still running after {timeout} s (hang)")
    records = []
    for r in range(world_size):
        path = os.path.join(out_dir, f"rank{r}.pt")
        record = torch.load(path, weights_only=False) if os.path.exists(path) else {"ok": False, "error": "no result", "traceback": ""}
        record["exitcode"] = procs[r].exitcode
        RANK_CPU_SECONDS[0] += record.get("cpu_seconds", 0.0)
        for part, value in record.get("compile_parts", {}).items():
            RANK_COMPILE_PARTS[part] = RANK_COMPILE_PARTS.get(part, 0.0) + value
        records.append(record)
    if not allow_failures:
        failed = [(r, rec) for r, rec in enumerate(records) if not rec["ok"]]
        if failed:
            r, rec = failed[0]
            raise AssertionError(f"rank {r} failed: {rec['error']}\n{rec.get('traceback', '')}")
    return records
