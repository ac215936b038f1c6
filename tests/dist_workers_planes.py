"""Rank functions for tests/test_planes.py (importable by spawned processes): the public call only."""

from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore")

CACHE = {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.3, "max_warmup_steps": 1}


def _profiled_collectives(fn) -> dict[str, int]:
    """Gloo collectives the profiler saw during fn() (names as the c10d layer records them)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict[str, int] = {}
    for event in prof.events():
        name = event.name
        if name.startswith("gloo:") or name.startswith("c10d::") or "all_to_all" in name or "allgather" in name:
            counts[name] = counts.get(name, 0) + 1
    return counts


def steady_calls(rank, world_size, cache=None, async_ulysses=False, wrong_device=False):
    """Tiny FLUX (2 joint + 2 single blocks), Ulysses over the world: per call, what each plane carried,
    how often the ranks exchanged shapes, and the collectives of one steady call."""
    from npu_dit.runtime import planes
    from npu_dit.runtime.dist import process_group
    from tests.conftest import tiny_model_and_inputs

    _, model, inputs = tiny_model_and_inputs("flux")
    options = {"ulysses_degree": world_size, "async_ulysses": async_ulysses}
    if cache is not None:
        options["cache"] = cache
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options=options)
    per_call = []
    outs = []
    with torch.no_grad():
        for step, t in enumerate([1.0, 0.9, 0.8, 0.7]):
            planes.reset_counts()
            outs.append(compiled(**dict(inputs, timestep=torch.tensor([t])))[0])
            per_call.append({key: n for key, n in planes.CALLS.items()})
        profiled = _profiled_collectives(lambda: compiled(**dict(inputs, timestep=torch.tensor([0.6]))))
        planes.reset_counts()
        # a new prompt length: a new signature, exchanged once, then steady again
        from tests.conftest import tiny_model_and_inputs as again

        _, _, longer = again("flux", prompt_len=20)
        for t in (1.0, 0.9):
            compiled(**dict(longer, timestep=torch.tensor([t])))
        after_change = dict(planes.counts())
    host = planes.host_group()
    from npu_dit.backend import RECORDS

    ctx = RECORDS[-1].parallel
    device_group = process_group(ctx).group_name
    result = {
        "per_call": per_call, "profiled": profiled, "after_change": after_change,
        "host_group": host.group_name, "device_group": device_group,
        "declared": {"host": str(planes.declared_device(host)), "device": str(planes.declared_device(device_group))},
        "counts": dict(RECORDS[-1].report.counts), "out": outs[0],
    }
    if wrong_device:
        # the device group declared as a GPU's: the next data collective gets a CPU tensor and must fail
        planes.declare(device_group, torch.device("cuda", 0))
        try:
            with torch.no_grad():
                compiled(**dict(inputs, timestep=torch.tensor([0.5])))
            result["wrong_device_error"] = None
        except Exception as exc:  # noqa: BLE001 - reported to the test
            result["wrong_device_error"] = f"{type(exc).__name__}: {exc}"
        finally:
            planes.declare(device_group, torch.device("cpu"))
    return result


def disagree_on_a_new_signature(rank, world_size):
    """Both ranks agree on the first shapes, then change them differently: the first call of the new
    signature exchanges on both ranks, so both raise RankMismatchError (no hang, no Gloo abort)."""
    import time

    from tests.conftest import tiny_model_and_inputs

    _, model, inputs = tiny_model_and_inputs("flux")
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"ulysses_degree": world_size})
    _, _, changed = tiny_model_and_inputs("flux", prompt_len=16 if rank == 0 else 20)
    with torch.no_grad():
        compiled(**inputs)
        compiled(**inputs)
        start = time.monotonic()
        try:
            compiled(**changed)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            return type(exc).__name__, str(exc), time.monotonic() - start
    return None, "", time.monotonic() - start


def fused_under_inductor(rank, world_size):
    """Sync Ulysses (Q/K/V in one all-to-all) with the rewritten graph compiled by Inductor."""
    from npu_dit.backend import RECORDS
    from tests.conftest import tiny_model_and_inputs

    _, model, inputs = tiny_model_and_inputs("flux")
    compiled = torch.compile(model, backend="npu_dit", dynamic=True,
                             options={"ulysses_degree": world_size, "inner_compiler": "inductor"})
    with torch.no_grad():
        out = compiled(**dict(inputs, timestep=torch.tensor([1.0])))[0]
        profiled = _profiled_collectives(lambda: compiled(**dict(inputs, timestep=torch.tensor([1.0]))))
    return {"out": out, "counts": dict(RECORDS[-1].report.counts), "profiled": profiled}


def _inner_compiles() -> int:
    """How many times a graph compiler compiled the live rewritten graphs (0 under eager)."""
    import gc
    import warnings

    from npu_dit.runtime.executor import GraphExecutor

    with warnings.catch_warnings():  # gc.get_objects() touches deprecated module attributes
        warnings.simplefilter("ignore")
        executors = [o for o in gc.get_objects() if isinstance(o, GraphExecutor)]
    return sum(getattr(e.compiled, "compiles", 0) for e in executors)


def fp8_calls(rank, world_size, modes=((False, "eager"),)):
    """Tiny FLUX with comm_dtype="float8_e4m3fn", sync (Q/K/V packed in one message) and/or async (one
    message per operand), each mode `(async_ulysses, inner_compiler)`: the output of one call and the
    bytes each traced collective sent (counted where the helpers run: every call under eager, the
    trace under Inductor)."""
    from npu_dit.backend import RECORDS
    from npu_dit.runtime import planes
    from tests.conftest import tiny_model_and_inputs

    _, model, inputs = tiny_model_and_inputs("flux")
    results = {}
    for async_ulysses, inner in modes:
        compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={
            "ulysses_degree": world_size, "async_ulysses": async_ulysses, "comm_dtype": "float8_e4m3fn",
            "inner_compiler": inner})
        with torch.no_grad():
            compiled(**dict(inputs, timestep=torch.tensor([1.0])))
            planes.reset_counts()
            out = compiled(**dict(inputs, timestep=torch.tensor([1.0])))[0]
        name = ("async" if async_ulysses else "sync") + ("" if inner == "eager" else f"+{inner}")
        results[name] = {
            "out": out, "sent": planes.sent_bytes(), "calls": planes.counts("data"),
            "counts": dict(RECORDS[-1].report.counts), "inner_compiles": _inner_compiles()}
        torch._dynamo.reset()
    return results
