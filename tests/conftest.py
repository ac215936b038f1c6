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
# `make test` runs the suite on two pytest-xdist workers that take one test at a time
# (`-n 2 --dist load --maxschedchunk 1`), longest first: the tests are ordered by the durations of an
# earlier run (tests/durations.json; `tools/test_durations.py` refreshes it), so the long
# multi-process tests start early and the last minutes hold only short tests, not one long test
# with the other core idle. A test not in the file weighs as the shortest listed one if it starts
# processes (`run_ranks`, `subprocess`; read from its source and the tests-package functions it
# calls), as nothing otherwise.

_STARTS_PROCESSES = re.compile(r"\brun_ranks\s*\(|\bsubprocess\.|\bPopen\s*\(")
_CALLED = re.compile(r"\b([A-Za-z_]\w*)\s*\(")
_DURATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")


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


def pytest_collection_modifyitems(config, items):
    import json

    with open(_DURATIONS) as f:
        durations = json.load(f)
    shortest = min(durations.values())

    def weight(item) -> float:
        if item.nodeid in durations:
            return durations[item.nodeid]
        fn = getattr(item, "function", None)
        return shortest if fn is not None and _starts_processes(fn, set()) else 0.0

    items.sort(key=weight, reverse=True)  # stable: ties keep the collection order


# ---------------------------------------------------------------------------------------------
# Where the suite's time goes: `NPU_DIT_TEST_CPU_LOG=FILE make test` appends one JSON line per test
# (wall seconds, CPU seconds of the test process, of the processes it waited for, and of the ranks
# it started with run_ranks, which the fork server reaps; npu_dit's compile count and seconds by part in
# the test process and those ranks, not in the command-line subprocesses; its xdist worker).

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

        def compiles():  # npu_dit's compile seconds by part, this process's and its ranks' together
            from npu_dit.progress import compile_time_parts

            own = compile_time_parts()
            return {k: v + dist_utils.RANK_COMPILE_PARTS.get(k, 0.0) for k, v in own.items()}

        start = (time.time(), usage(resource.RUSAGE_SELF), usage(resource.RUSAGE_CHILDREN),
                 dist_utils.RANK_CPU_SECONDS[0], compiles())
        yield
        end = (time.time(), usage(resource.RUSAGE_SELF), usage(resource.RUSAGE_CHILDREN),
               dist_utils.RANK_CPU_SECONDS[0], compiles())
        record = {"test": item.nodeid, "start": start[0], "wall": end[0] - start[0],
                  "self": end[1] - start[1], "children": end[2] - start[2], "ranks": end[3] - start[3],
                  "compile": {k: round(v - start[4][k], 3) for k, v in end[4].items()},
                  "worker": os.environ.get("PYTEST_XDIST_WORKER")}
        with open(_CPU_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
