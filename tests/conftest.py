import inspect
import os
import re
import sys
import warnings

import pytest
import torch

from npu_dit.models import build_transformer, get_model
from npu_dit.tools.capture import capture_graph

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", message="There are modules in")

TINY_CALLS = {
    # name -> (model, example_inputs kwargs)
    "flux": ("flux.1-dev", dict(height=128, width=128, prompt_len=12)),
    "qwen-edit": ("qwen-image-edit", dict(height=128, width=128, prompt_len=12)),
    "qwen-edit-masked": ("qwen-image-edit", dict(height=128, width=128, prompt_len=12, batch=2)),
    "qwen-edit-2509": (
        "qwen-image-edit-2509",
        dict(height=128, width=128, prompt_len=10, input_images=[(128, 128), (64, 96)]),
    ),
}


def tiny_model_and_inputs(key: str, config_overrides: dict | None = None, **overrides):
    name, kwargs = TINY_CALLS[key]
    spec = get_model(name)
    config = spec.config("tiny", **(config_overrides or {}))
    model = build_transformer(spec, config, seed=0)
    inputs = spec.example_inputs(config, **{**kwargs, **overrides})
    return spec, model, inputs


_CAPTURES = {}


@pytest.fixture(scope="session")
def tiny_capture():
    """capture(key) -> (model, inputs, Captured); cached for the session."""

    def get(key: str):
        if key not in _CAPTURES:
            _, model, inputs = tiny_model_and_inputs(key)
            _CAPTURES[key] = (model, inputs, capture_graph(model, inputs, dynamic=True))
        return _CAPTURES[key]

    return get


# ---------------------------------------------------------------------------------------------
# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`). The tests that
# start processes (Gloo ranks, torchrun, the CLI) already keep both cores busy, so they all run on
# one worker, one after the other, in the "processes" group; the single-process tests (one Dynamo
# trace at a time, one core) run on the other worker beside them. Which tests start processes is
# read from their source: a call of `run_ranks` or `subprocess`, in the test or in a
# function of the tests package it calls.

_STARTS_PROCESSES = re.compile(r"\brun_ranks\s*\(|\bsubprocess\.|\bPopen\s*\(")
_CALLED = re.compile(r"\b([A-Za-z_]\w*)\s*\(")


def _starts_processes(fn, seen: set) -> bool:
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    if _STARTS_PROCESSES.search(source):
        return True
    module = sys.modules.get(getattr(fn, "__module__", ""), None)
    for name in _CALLED.findall(source):
        callee = getattr(module, name, None)
        if (inspect.isfunction(callee) and callee not in seen
                and (callee.__module__ or "").split(".")[0] == "tests"):
            seen.add(callee)
            if _starts_processes(callee, seen):
                return True
    return False


def _one_process(item) -> bool:
    """A parametrized launch of a single process (the README's `python script.py` blocks)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(params.get(name) == 1 for name in ("world", "world_size"))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        fn = getattr(item, "function", None)
        if fn is not None and _starts_processes(fn, set()) and not _one_process(item):
            item.add_marker(pytest.mark.xdist_group("processes"))


# ---------------------------------------------------------------------------------------------
# Where the suite's time goes: `NPU_DIT_TEST_CPU_LOG=FILE make test` appends one JSON line per test
# (wall seconds, CPU seconds of the test process, of the processes it waited for, and of the ranks
# it started with run_ranks, which the fork server reaps; its xdist group and worker).

_CPU_LOG = os.environ.get("NPU_DIT_TEST_CPU_LOG")


if _CPU_LOG:
    import json
    import resource
    import time

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item):
        from tests import dist_utils

        def usage(who):
            u = resource.getrusage(who)
            return u.ru_utime + u.ru_stime

        start = (time.time(), usage(resource.RUSAGE_SELF), usage(resource.RUSAGE_CHILDREN),
                 dist_utils.RANK_CPU_SECONDS[0])
        yield
        end = (time.time(), usage(resource.RUSAGE_SELF), usage(resource.RUSAGE_CHILDREN),
               dist_utils.RANK_CPU_SECONDS[0])
        group = next((m.args[0] for m in item.iter_markers("xdist_group")), None)
        record = {"test": item.nodeid, "start": start[0], "wall": end[0] - start[0],
                  "self": end[1] - start[1], "children": end[2] - start[2], "ranks": end[3] - start[3],
                  "group": group, "worker": os.environ.get("PYTEST_XDIST_WORKER")}
        with open(_CPU_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
